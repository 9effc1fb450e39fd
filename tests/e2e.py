"""End-to-end helpers: a temporary copy of the project as its own git + DVC repository, driven
through the real `dvc` and `git` command lines the way users drive nascore.

The copy holds the project's tracked and untracked-but-not-ignored files (what a clone would
have), so the tests see exactly the committed pipeline; params.yaml is the committed one, since
`dvc exp run -S` leaves the workspace's holding the last experiment. Commands run with this interpreter's
folder first on PATH, so `python -m stages.<name>` in dvc.yaml finds the test environment's python.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests._params import committed_params_text

PROJECT = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    return [f for f in out if f and (PROJECT / f).is_file()]


def base_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="nascore tests", GIT_AUTHOR_EMAIL="tests@nascore.invalid",
               GIT_COMMITTER_NAME="nascore tests", GIT_COMMITTER_EMAIL="tests@nascore.invalid",
               DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
               # as tests/conftest.py: the stages' tiny convolutions gain nothing from a second
               # intra-op thread, and two threads fighting the other test worker for 2 cores run slower
               OMP_NUM_THREADS="1")
    for var in ("NASCORE_PROJECT_ROOT", "NASCORE_RUN_KEY", "MLFLOW_TRACKING_URI", "NASCORE_TRACKING",
                "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME"):
        env.pop(var, None)
    # The shared data folder sits beside the project; the copy finds it at the same relative place.
    return env


@dataclass
class Repo:
    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, timeout: float = 600, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=cwd or self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                                 f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
        return proc

    def dvc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, **kw)

    def git(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("git", *args, **kw)

    def stage(self, name: str, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", f"stages.{name}", **kw)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


def make_repo(dest: Path) -> Repo:
    """Copy the project into `dest` (a sibling of a `shared` link, like the real layout) and
    commit it as a fresh git repository."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, target)
    # the committed defaults, not the workspace's last `dvc exp run -S` (tests/_params.py)
    (dest / "params.yaml").write_text(committed_params_text(), encoding="utf-8")
    shared = PROJECT.parent / "shared"
    if shared.exists() and not (dest.parent / "shared").exists():
        (dest.parent / "shared").symlink_to(shared)
    repo = Repo(dest, base_env(dest))
    repo.git("init", "-q", "-b", "main")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "nascore under test")
    return repo


def set_params(repo: Repo, **values: object) -> None:
    """Edit params.yaml top-level/dotted keys with DVC's own `-S` syntax would need a run; this
    rewrites the file (for tests that run stages by hand)."""
    import yaml
    path = repo.root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in values.items():
        node = params
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
