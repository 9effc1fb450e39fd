"""The committed params.yaml, which the tests take as the project's defaults.

`dvc exp run -S profile=smoke` (and `dvc exp apply`) rewrite the workspace's params.yaml and leave
it so: it holds the user's last experiment, not the defaults. Tests that build on the defaults read
the version at git HEAD instead, so a workspace experiment does not turn the suite red. Outside a
git checkout (an unpacked sdist) the file itself is the default.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


PROJECT = Path(__file__).resolve().parents[1]


def committed_params_text() -> str:
    try:
        out = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=PROJECT, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0:
        return out.stdout
    return (PROJECT / "params.yaml").read_text(encoding="utf-8")


def workspace_params_differ() -> bool:
    return committed_params_text() != (PROJECT / "params.yaml").read_text(encoding="utf-8")


def default_params(tmp_dir: Path) -> dict[str, Any]:
    """The committed params, loaded by nascore's own loader (written to `tmp_dir` first)."""
    from nascore import config as C
    path = tmp_dir / "committed-params.yaml"
    path.write_text(committed_params_text(), encoding="utf-8")
    return C.load_params(path)
