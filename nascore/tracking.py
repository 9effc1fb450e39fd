"""One facade over MLflow: a parent run per pipeline execution, a nested run per stage.

Users meet this through `dvc repro`, `dvc exp run` and `dvc queue start`; every stage is a separate
process, so the stages of one pipeline execution find their common parent run by a tag,
`nascore.run_key`, rather than through MLflow's in-process "active run".

Where the store lives
---------------------
`MLFLOW_TRACKING_URI` when set (a relative `sqlite:///x.db` is taken relative to the project root),
else `sqlite:///<absolute project root>/mlflow.db`, with artifacts in `<project root>/mlartifacts`
(the experiment's `artifact_location`; the same folder `mlflow server` uses by default). Both must
be absolute: `dvc exp run --temp` and queued experiments run in a copy of the repository at
`<root>/.dvc/tmp/exps/standalone/tmpXXXX` (`--temp`) or `<root>/.dvc/tmp/exps/tmpXXXX` (queue),
which DVC deletes afterwards; a relative store would be written there and lost. The experiment is
`MLFLOW_EXPERIMENT_NAME` when set, else "nascore".

The project root (`project_root`) is, in order: `NASCORE_PROJECT_ROOT`; the folder holding
`.dvc/tmp/exps/` when the working directory is inside a DVC temp workspace; the nearest ancestor
holding `.dvc` or `.git`; the working directory.

The run key rule (`run_key`)
----------------------------
1. `NASCORE_RUN_KEY` when set (to group stages run by hand, or by another orchestrator).
2. Under DVC, the nearest ancestor process that is `dvc` (`dvc repro`, `dvc exp run`, or the
   per-experiment `dvc exp exec-run` of a queue worker) identifies the invocation: the key is
   `<DVC_EXP_NAME or "repro">@<host>:<boot id>:<pid>:<start time>` read from /proc. All stages of
   one invocation are children of that one process; a later invocation, even of an experiment
   forced to reuse its name (`dvc exp run -n x -f`), gets a new key, so it never appends to an old
   parent run.
3. Without /proc (macOS) but under `dvc exp run`: `DVC_EXP_NAME` (DVC keeps names unique unless
   forced); under a plain `dvc repro`: `repro@<host>:<parent pid>`.
4. A stage run by hand (no dvc ancestor): a fresh key per process, i.e. its own parent run.

The parent run is named after the DVC experiment (`DVC_EXP_NAME`), else `repro-<time>` or
`manual-<stage>-<time>`; it carries the caller's tags (method, space, dataset, seed), the git
commit (the experiment's baseline `DVC_EXP_BASELINE_REV`, else `git rev-parse HEAD`) and the DVC
experiment name. Each stage reopens the parent (RUNNING) and closes it with its own final status,
so after the last stage the parent reads FINISHED, or FAILED if that stage failed.

A process killed outright (SIGKILL, the OOM killer) cannot close its runs. Every run therefore
carries its owner process (`nascore.owner`: host, boot id, PID namespace, pid, start time; the
parent's owner is the dvc invocation), and each stage, as it starts, closes as KILLED the RUNNING
runs whose owner it can see (same host, boot and PID namespace) and is gone (tag `nascore.reaped` says why). The rerun that resumes a killed search is a
new invocation, hence a new parent; the killed one reads KILLED, not RUNNING forever.

Failure policy
--------------
Tracking never kills a run. Every MLflow call goes through `_Backend.call`; the first failure
(MLflow missing, server unreachable, database error) prints ONE warning line naming the URI and the
reason and turns tracking off for this Tracker; the stage's outputs are unaffected. SQLite's
"database is locked" (parallel queue workers on one file) is retried with jittered exponential
back-off for up to `retry_budget_s` (30 s) of elapsed time before that warning; MLflow itself
already waits up to 20 s (`PRAGMA busy_timeout`) inside each attempt. For `dvc queue start -j N`
with N > 2, one local `mlflow server --backend-store-uri sqlite:///mlflow.db` and
`MLFLOW_TRACKING_URI=http://127.0.0.1:5000` avoids the lock entirely. With a server, a health
check (5 s) runs first, and MLflow's HTTP retries default to 3 with back-off factor 1 and a 30 s
timeout (set `MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `_BACKOFF_FACTOR` / `_TIMEOUT` to override), so a
server that dies mid-run costs seconds, not MLflow's default ~4 minutes of retrying.
`NASCORE_TRACKING=off` turns tracking off silently. Creating a new SQLite store is serialised by
a file lock, because MLflow migrates a fresh database unguarded and two queue workers starting on a
new project would otherwise both fail ("table ... already exists").

Usage (a stage)
---------------
    with Tracker.start_stage("search", tags={"method": m, "space": s, "dataset": d, "seed": seed},
                             params=resolved_params) as tr:
        for epoch in ...:
            tr.log_metrics({"train_loss": ..., "param_free_ops": ...}, step=epoch)
        tr.log_artifact("outputs/search/genotype.json")
        tr.log_file_reference("outputs/search/supernet.pt", "supernet")
    # evaluate: tr.log_summary_to_parent(final_metrics, ["metrics/final.json", "cells/normal.svg"])

Models are never logged with `mlflow.pytorch` (it pickles classes); stages log genotype JSON and
`state_dict` files as plain artifacts, and big checkpoints (DVC outputs) only by path and sha256
(`log_file_reference`).
"""
from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

try:
    import fcntl
except ImportError:      # Windows: no advisory locks; a fresh store is then created unguarded
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_PROJECT_ROOT = "NASCORE_PROJECT_ROOT"
ENV_RUN_KEY = "NASCORE_RUN_KEY"
ENV_TRACKING = "NASCORE_TRACKING"
DEFAULT_EXPERIMENT = "nascore"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
DVC_TEMP_PARTS = (".dvc", "tmp", "exps")     # observed with DVC 3.67 for --temp and queued runs

TAG_RUN_KEY = "nascore.run_key"
TAG_ROLE = "nascore.role"                    # "pipeline" (parent) or "stage" (child)
TAG_STAGE = "nascore.stage"
TAG_PARENT = "mlflow.parentRunId"            # what the MLflow UI nests runs by
TAG_OWNER = "nascore.owner"                  # <host>:<boot id>:<pid>:<start ticks> of the process
TAG_REAPED = "nascore.reaped"                # why a RUNNING run was closed as KILLED

# MLflow's limits (mlflow/utils/validation.py); copied so that this module imports without mlflow.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
TRUNCATION_MARKER = "...[truncated]"

_FALSY = {"0", "false", "off", "no", "disabled"}
_TRUTHY = {"", "1", "true", "on", "yes", "enabled"}
# A dead server costs ~1+2+4 s of retries (hung: 4 x 30 s) instead of MLflow's ~4 minutes.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


# --- where things are ---------------------------------------------------------------------------
def _outside_dvc_temp(path: Path) -> Path | None:
    """The real project root when `path` lies inside a DVC temp workspace, else None."""
    parts = path.parts
    n = len(DVC_TEMP_PARTS)
    for i in range(len(parts) - n, 0, -1):     # innermost match wins (a project inside a temp copy)
        if parts[i:i + n] == DVC_TEMP_PARTS:
            return Path(*parts[:i])
    return None


def project_root(start: str | Path | None = None) -> Path:
    """The project's absolute root: env, DVC temp workspace's outer folder, repo root, or cwd."""
    env = os.environ.get(ENV_PROJECT_ROOT)
    if env:
        return Path(env).expanduser().resolve()
    here = Path(start if start is not None else os.getcwd()).expanduser().resolve()
    outer = _outside_dvc_temp(here)
    if outer is not None:
        return outer
    # `.dvc` before `.git`: a DVC project made with `dvc init --subdir` sits below the git root.
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def workspace_root(start: str | Path | None = None) -> Path:
    """The repository copy a stage runs in (a DVC temp workspace, or the project itself)."""
    here = Path(start if start is not None else os.getcwd()).expanduser().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def _is_database_uri(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in {"sqlite", "postgresql", "mysql", "mssql"}


def resolve_tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` (relative SQLite paths anchored at `root`), else the project's SQLite."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{(root / DB_NAME).as_posix()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if rel and not rel.startswith(":memory:"):
            return f"sqlite:///{(root / rel).resolve().as_posix()}"
    return uri


def redact_uri(uri: str) -> str:
    """The URI without user:password, for messages."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


# --- the run key --------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of `pid` from /proc, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()     # the command name may hold spaces and ')'
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _is_dvc_cmdline(argv: list[str]) -> bool:
    names = [os.path.basename(a) for a in argv[:3]]
    if any(n in ("dvc", "dvc.exe") for n in names):
        return True
    return any(a == "-m" and b == "dvc" for a, b in zip(argv, argv[1:3]))


def _dvc_ancestor() -> tuple[int, int] | None:
    """(pid, start ticks) of the nearest ancestor process that is `dvc`, via /proc; else None."""
    pid = os.getppid()
    for _ in range(64):                          # bounded: a cycle or a deep tree never hangs us
        if pid <= 1:
            return None
        stat = _proc_stat(pid)
        if stat is None:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return None
        if _is_dvc_cmdline(argv):
            return pid, stat[1]
        pid = stat[0]
    return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "noboot"


def _safe_key(text: str) -> str:
    return re.sub(r"[^\w.:@-]", "_", text)[:MAX_KEY_LENGTH]


def run_key() -> str:
    """The key shared by all stages of one pipeline execution (rule: module docstring)."""
    env = os.environ.get(ENV_RUN_KEY)
    if env:
        return _safe_key(env)
    exp = os.environ.get("DVC_EXP_NAME")
    host = socket.gethostname()
    ancestor = _dvc_ancestor()
    if ancestor is not None:
        pid, start = ancestor
        return _safe_key(f"{exp or 'repro'}@{host}:{_boot_id()}:{pid}:{start}")
    if exp:
        return _safe_key(exp)
    if os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT"):
        return _safe_key(f"repro@{host}:{os.getppid()}")
    return _safe_key(f"manual@{host}:{uuid.uuid4().hex}")


def _pid_namespace() -> str:
    """This process's PID namespace (containers on one kernel share the boot id, not this)."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or "nons"
    except OSError:
        return "nons"


def process_identity(pid: int) -> str | None:
    """`<host>:<boot id>:<pid namespace>:<pid>:<start ticks>` of a process this one can see:
    names it for as long as the machine runs (a reused pid has another start time); None without
    /proc."""
    stat = _proc_stat(pid)
    if stat is None:
        return None
    return f"{socket.gethostname()}:{_boot_id()}:{_pid_namespace()}:{pid}:{stat[1]}"


def _identity_is_gone(identity: str) -> bool:
    """True when `identity` (this host, boot and PID namespace) names a process that no longer
    runs."""
    try:
        pid, start = (int(x) for x in identity.rsplit(":", 2)[1:])
    except ValueError:
        return False
    stat = _proc_stat(pid)
    return stat is None or stat[1] != start


def git_commit(start: str | Path | None = None) -> str | None:
    """The commit this run belongs to: a DVC experiment's baseline, else HEAD; None outside git."""
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(workspace_root(start)),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


# --- values MLflow accepts ----------------------------------------------------------------------
def sanitize_key(key: str) -> str:
    """A param/metric/tag key MLflow accepts: [/\\w.- ] only, no empty/'.'/'..' path segments."""
    text = re.sub(r"[^\w.\- /]", "_", str(key))
    segments = [s for s in text.split("/") if s not in ("", ".", "..")]
    text = "/".join(segments) or "_"
    return text[:MAX_KEY_LENGTH]


def truncate(value: str, limit: int) -> str:
    """`value` cut to `limit` characters, ending with a marker when it was cut."""
    if len(value) <= limit:
        return value
    return value[:limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _to_plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    return value


def param_value(value: Any) -> str:
    """A param value as text: strings as they are, everything else as JSON (true, null, [1, 2])."""
    value = _to_plain(value)
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> {"search.epochs": "50", ...}; dataclasses and mappings are descended into."""
    out: dict[str, str] = {}
    for key, value in _to_plain(params).items():
        name = f"{prefix}.{key}" if prefix else str(key)
        value = _to_plain(value)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[name] = param_value(value)
    return out


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return truncate(text, 300)


def _is_locked(err: BaseException) -> bool:
    """SQLite's transient lock errors, however deeply MLflow/SQLAlchemy wrapped them."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if "database is locked" in text or "database table is locked" in text or "database is busy" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrackingConfig:
    """Where and how to track. `from_env` applies the rules of the module docstring."""

    tracking_uri: str
    project_root: Path
    run_key: str
    experiment_name: str = DEFAULT_EXPERIMENT
    artifact_location: str | None = None     # only used when this process creates the experiment
    parent_run_name: str | None = None        # None: derived from DVC_EXP_NAME / time at creation
    enabled: bool = True
    retry_budget_s: float = 30.0              # elapsed time spent retrying "database is locked"
    health_timeout_s: float = 5.0             # a dead server is reported in seconds, not minutes

    @classmethod
    def from_env(cls, *, experiment_name: str | None = None, start: str | Path | None = None,
                 **overrides: Any) -> "TrackingConfig":
        root = project_root(start)
        uri = resolve_tracking_uri(root)
        artifacts = (root / ARTIFACTS_DIR).as_uri() if _is_database_uri(uri) else None
        setting = os.environ.get(ENV_TRACKING, "on").strip().lower()
        enabled = setting not in _FALSY
        if enabled and setting not in _TRUTHY:
            log.warning("%s=%r is neither on (%s) nor off (%s): tracking stays on", ENV_TRACKING,
                        setting, "/".join(sorted(_TRUTHY - {""})), "/".join(sorted(_FALSY)))
        values: dict[str, Any] = dict(
            tracking_uri=uri, project_root=root, run_key=run_key(),
            experiment_name=experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
            artifact_location=artifacts, enabled=enabled)
        values.update(overrides)
        return cls(**values)


# --- the guarded backend ------------------------------------------------------------------------
def _quiet_mlflow_logging() -> None:
    """Silence MLflow's first-use chatter; our own one-line warning reports real failures."""
    # alembic: "Context impl SQLiteImpl", "Running upgrade ..." on a new database.
    # mlflow.store.db.utils: "Creating initial MLflow database tables..." and a full traceback for
    # every "database is locked", which we retry and, if it persists, report in one line.
    for name, level in (("alembic", logging.WARNING), ("mlflow.store.db.utils", logging.CRITICAL)):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < level:
            logger.setLevel(level)


def _check_http(uri: str, timeout: float) -> str | None:
    """None when an HTTP tracking server answers at all (any status), else why it does not."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None                               # it answered (401/404/...): reachable
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return None      # it answered; TLS is MLflow's to settle (MLFLOW_TRACKING_SERVER_CERT_PATH)
        return f"cannot reach the tracking server ({reason})"


@contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite store across processes on this machine.

    MLflow 3's tracking store creates and migrates the tables of a new database without a lock;
    parallel queue workers starting on a fresh project then fail with "table ... already exists" or
    "duplicate column name". Opening an existing store only reads, so holding this lock costs the
    1-2 s of schema checking per process and nothing more.
    """
    if fcntl is None or not uri.startswith("sqlite:///"):
        yield
        return
    # The lock is on the database's folder itself: no lock file to leave behind or clean up.
    folder = Path(os.path.abspath(uri[len("sqlite:///"):])).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:      # unreadable folder: MLflow will report the real problem
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)     # closing releases the lock


@dataclass
class _Backend:
    """The MLflow client plus the state that makes tracking fail soft: warned once, then off."""

    config: TrackingConfig
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    client: Any = None
    experiment_id: str | None = None
    active: bool = False
    warned: bool = False
    retries: int = 0                                      # lock retries so far (for tests, bench)
    # A private RNG for back-off jitter: the global `random` may be seeded by the training run,
    # and drawing from it here would change that run's random stream.
    rng: random.Random = field(default_factory=random.Random)

    def disable(self, reason: str) -> None:
        self.active = False
        if not self.warned:
            self.warned = True
            log.warning("nascore: MLflow tracking off for the rest of this process "
                        "(%s): %s; outputs are unaffected", redact_uri(self.config.tracking_uri),
                        reason)

    def warn(self, message: str) -> None:
        """A caller-side problem (missing artifact, bad metric): reported, tracking stays on."""
        log.warning("nascore: %s", message)

    def call(self, what: str, fn: Callable[[], T]) -> T | None:
        """Run one MLflow call; retry SQLite locks with back-off; on failure warn once and stop."""
        if not self.active:
            return None
        start = self.clock()
        delay = 0.05
        while True:
            try:
                return fn()
            except Exception as e:   # any backend failure: tracking must never kill the stage
                # jitter de-synchronises parallel queue workers contending for the same file
                pause = delay * (0.5 + self.rng.random())
                if _is_locked(e) and self.clock() - start + pause <= self.config.retry_budget_s:
                    self.retries += 1
                    self.sleep(pause)
                    delay = min(delay * 2, 4.0)
                    continue
                if _is_locked(e):
                    self.disable(f"{what}: the SQLite database stayed locked for "
                                 f"{self.config.retry_budget_s:.0f} s ({_one_line(e)}); for parallel "
                                 f"queue workers run one `mlflow server` and set MLFLOW_TRACKING_URI")
                else:
                    self.disable(f"{what}: {_one_line(e)}")
                return None

    def connect(self) -> None:
        cfg = self.config
        if not cfg.enabled:
            return                                        # NASCORE_TRACKING=off: silent by request
        try:
            import mlflow  # noqa: F401  (import cost ~2 s: paid only when tracking is on)
            from mlflow import MlflowClient
        except Exception as e:   # ImportError, or a broken install: the run goes on untracked
            self.disable(f"MLflow is not importable ({_one_line(e)}); pip install mlflow to track runs")
            return
        _quiet_mlflow_logging()
        if cfg.tracking_uri.startswith(("http://", "https://")):
            # MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) stall a stage for
            # minutes when the server dies mid-run; a training run is better served by giving up
            # within seconds. Only defaults: a value the user exported wins.
            for name, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            problem = _check_http(cfg.tracking_uri, cfg.health_timeout_s)
            if problem:
                self.disable(problem)
                return
        self.active = True

        def open_client() -> Any:
            with _store_init_lock(cfg.tracking_uri):
                return MlflowClient(tracking_uri=cfg.tracking_uri)

        self.client = self.call("opening the tracking store", open_client)
        if self.client is not None:
            self.experiment_id = self.call(f"setting up experiment {cfg.experiment_name!r}",
                                           self._get_or_create_experiment)

    def _get_or_create_experiment(self) -> str:
        client, name = self.client, self.config.experiment_name
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=self.config.artifact_location)
            except Exception as e:
                exp = client.get_experiment_by_name(name)    # another queue worker created it first
                if exp is None:
                    raise e
        if exp.lifecycle_stage != "active":
            raise RuntimeError(f"experiment {name!r} is deleted; restore it with `mlflow experiments "
                               f"restore --experiment-id {exp.experiment_id}` or set MLFLOW_EXPERIMENT_NAME")
        return exp.experiment_id


# --- the facade ---------------------------------------------------------------------------------
class Tracker:
    """A stage's view of tracking: its own nested run under the pipeline's parent run.

    Use as `with Tracker.start_stage("search", tags=..., params=...) as tr: ...`. Every method is
    a no-op once tracking is off (`enabled` False), so stages never branch on it.
    """

    def __init__(self, config: TrackingConfig | None = None, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config or TrackingConfig.from_env()
        self._backend = _Backend(self.config, sleep=sleep)
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.stage: str | None = None
        self._params: dict[str, str] = {}
        self._ended = False

    # -- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def start_stage(cls, stage: str, *, tags: Mapping[str, Any] | None = None,
                    params: Mapping[str, Any] | None = None, run_name: str | None = None,
                    config: TrackingConfig | None = None) -> "Tracker":
        """Open the stage's nested run (finding or creating the parent) and log `params`."""
        tracker = cls(config)
        tracker._begin(stage, dict(tags or {}), dict(params or {}), run_name)
        return tracker

    @classmethod
    def disabled(cls) -> "Tracker":
        """A tracker that records nothing (library use, tests)."""
        return cls(TrackingConfig(tracking_uri="", project_root=Path.cwd(), run_key="", enabled=False))

    @property
    def enabled(self) -> bool:
        return self._backend.active and self.run_id is not None

    @property
    def tracking_uri(self) -> str:
        return self.config.tracking_uri

    def _begin(self, stage: str, tags: dict[str, Any], params: dict[str, Any],
               run_name: str | None) -> None:
        self.stage = stage
        b = self._backend
        b.connect()
        if not b.active:
            return
        common = {str(k): param_value(v) for k, v in tags.items()}
        commit = common.get("git_commit") or git_commit()
        if commit:
            common.setdefault("git_commit", commit)
            common.setdefault("mlflow.source.git.commit", commit)
        dvc = {k: v for k, v in (("dvc.exp_name", os.environ.get("DVC_EXP_NAME")),
                                 ("dvc.baseline_rev", os.environ.get("DVC_EXP_BASELINE_REV"))) if v}
        try:
            self._close_orphans()
        except Exception as e:   # housekeeping: a store that cannot do it still tracks this stage
            log.debug("closing the runs of killed processes failed: %s", _one_line(e))
        # the parent lives as long as the dvc invocation (or this process, run by hand)
        ancestor = _dvc_ancestor()
        owner = {TAG_OWNER: i} if (i := process_identity(ancestor[0] if ancestor else os.getpid())) else {}
        self.parent_run_id = b.call("finding the pipeline's parent run",
                                    lambda: self._find_or_create_parent({**common, **dvc, **owner}))
        if self.parent_run_id is None:
            return
        me = {TAG_OWNER: i} if (i := process_identity(os.getpid())) else {}
        child_tags = {**common, **dvc, TAG_PARENT: self.parent_run_id, TAG_ROLE: "stage",
                      TAG_STAGE: stage, TAG_RUN_KEY: self.config.run_key, **me,
                      "mlflow.source.name": os.path.basename(sys.argv[0] or "python"),
                      "mlflow.source.type": "LOCAL", **_user_tag()}
        if os.environ.get("DVC_STAGE"):
            child_tags["dvc.stage"] = os.environ["DVC_STAGE"]
        run = b.call(f"starting the run of stage {stage!r}", lambda: b.client.create_run(
            b.experiment_id, run_name=run_name or stage, tags=_clean_tags(child_tags)))
        if run is None:
            return
        self.run_id = run.info.run_id
        if params:
            self.log_params(params)
            self.log_dict(params, "params.json")   # the nested original: nothing truncated

    def _find_or_create_parent(self, tags: dict[str, str]) -> str:
        b, key = self._backend, self.config.run_key
        client = b.client
        from mlflow.entities import ViewType

        def matching() -> list[Any]:
            return client.search_runs(
                [b.experiment_id],
                filter_string=f"tags.`{TAG_RUN_KEY}` = '{key}' and tags.`{TAG_ROLE}` = 'pipeline'",
                run_view_type=ViewType.ACTIVE_ONLY, max_results=20,
                order_by=["attributes.start_time ASC"])

        def earliest(runs: list[Any]) -> str:
            return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id

        found = matching()
        if found:
            parent = earliest(found)
            # the owner tag first: a parent RUNNING under a dead owner would be closed as orphaned
            client.log_batch(parent, tags=_tag_entities(_clean_tags(tags)))
            client.update_run(parent, status="RUNNING")
            return parent
        name = self.config.parent_run_name or _default_parent_name(self.stage or "stage")
        run = client.create_run(b.experiment_id, run_name=name, tags=_clean_tags(
            {**tags, TAG_RUN_KEY: key, TAG_ROLE: "pipeline", "mlflow.source.type": "LOCAL",
             "nascore.project_root": str(self.config.project_root), **_user_tag()}))
        mine = run.info.run_id
        # Two processes may have raced past `matching()`; both agree on the earliest run and the
        # loser deletes its own, so one invocation never shows as two parents.
        found = matching()
        winner = earliest(found) if found else mine
        if winner != mine:
            client.delete_run(mine)
        return winner

    def _close_orphans(self) -> None:
        """Close as KILLED the RUNNING runs whose process is gone (SIGKILL, OOM killer, a lost
        shell): nothing else ever ends them, and MLflow would show them running forever. Only runs
        owned by a process this one can see (same host, boot and PID namespace) are judged; others,
        another machine's or another container's, are left alone."""
        b = self._backend
        here = process_identity(os.getpid())
        if here is None:
            return
        prefix = here.rsplit(":", 2)[0] + ":"
        runs = search_all_runs(b.client, b.experiment_id,
                               f"attributes.status = 'RUNNING' and tags.`{TAG_OWNER}` LIKE '{prefix}%'")
        for run in runs:
            owner = run.data.tags.get(TAG_OWNER, "")
            if owner.startswith(prefix) and _identity_is_gone(owner):
                b.client.set_tag(run.info.run_id, TAG_REAPED,
                                 f"its process ({owner}) was gone when a later stage started: killed "
                                 f"without a chance to close the run")
                b.client.set_terminated(run.info.run_id, "KILLED")

    def end(self, status: str = "FINISHED") -> None:
        """Close the stage run and mark the parent with the same status (see module docstring)."""
        if self._ended:
            return
        self._ended = True
        b = self._backend
        if self.run_id is not None:
            b.call("closing the stage run", lambda: b.client.set_terminated(self.run_id, status))
        if self.parent_run_id is not None:
            b.call("closing the parent run",
                   lambda: b.client.set_terminated(self.parent_run_id, status))

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    # -- logging ----------------------------------------------------------------------------------
    def _run_call(self, what: str, fn: Callable[[str], T], run_id: str | None = None) -> T | None:
        rid = run_id or self.run_id
        if rid is None or not self._backend.active:
            return None
        return self._backend.call(what, lambda: fn(rid))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log nested params under dotted keys; over-long values truncated with a marker.

        MLflow params are write-once: a key logged again with another value is skipped with a
        warning instead of failing the store call.
        """
        if not self.enabled:
            return
        from mlflow.entities import Param
        new: dict[str, str] = {}
        for key, value in flatten_params(params).items():
            k, v = sanitize_key(key), truncate(value, MAX_PARAM_VAL_LENGTH)
            if k in self._params:
                if self._params[k] != v:
                    self._backend.warn(f"param {k!r} was already logged as {self._params[k]!r}; "
                                       f"keeping it (MLflow params cannot change)")
                continue
            new[k] = v
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i:i + MAX_PARAMS_TAGS_PER_BATCH]
            self._run_call("logging params", lambda rid: self._backend.client.log_batch(rid, params=chunk))
        self._params.update(new)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at `step` (epoch); non-numeric values are skipped with a warning."""
        self._log_metrics(metrics, step, None)

    def _log_metrics(self, metrics: Mapping[str, Any], step: int | None, run_id: str | None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric
        ts, items, bad = _now_ms(), [], []
        for key, value in metrics.items():
            try:
                number = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError):
                bad.append(str(key))
                continue
            items.append(Metric(sanitize_key(key), number, ts, int(step or 0)))
        if bad:
            self._backend.warn(f"metrics {', '.join(bad)} are not numbers; not logged")
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            chunk = items[i:i + MAX_METRICS_PER_BATCH]
            self._run_call("logging metrics",
                           lambda rid: self._backend.client.log_batch(rid, metrics=chunk), run_id)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._set_tags(tags, None)

    def _set_tags(self, tags: Mapping[str, Any], run_id: str | None) -> None:
        if not self.enabled or not tags:
            return
        items = _tag_entities(_clean_tags({str(k): param_value(v) for k, v in tags.items()}))
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i:i + MAX_PARAMS_TAGS_PER_BATCH]
            self._run_call("setting tags", lambda rid: self._backend.client.log_batch(rid, tags=chunk),
                           run_id)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy one file (or a folder, recursively) into the run's artifacts."""
        self._log_artifact(path, artifact_path, None)

    def _log_artifact(self, path: str | Path, artifact_path: str | None, run_id: str | None) -> None:
        if not self.enabled:
            return
        p = Path(path)
        if not p.exists():
            self._backend.warn(f"artifact {p} does not exist; not logged")
            return
        if p.is_dir():
            sub = "/".join(x for x in (artifact_path, p.name) if x)
            self._run_call(f"logging artifacts {p}",
                           lambda rid: self._backend.client.log_artifacts(rid, str(p), sub), run_id)
        else:
            self._run_call(f"logging artifact {p}",
                           lambda rid: self._backend.client.log_artifact(rid, str(p), artifact_path),
                           run_id)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Copy the contents of `directory` into the run's artifacts (under `artifact_path`)."""
        if not self.enabled:
            return
        d = Path(directory)
        if not d.is_dir():
            self._backend.warn(f"artifact folder {d} does not exist; not logged")
            return
        self._run_call(f"logging artifacts {d}",
                       lambda rid: self._backend.client.log_artifacts(rid, str(d), artifact_path))

    def log_dict(self, data: Mapping[str, Any] | list[Any], artifact_file: str) -> None:
        """Write `data` as a JSON (or YAML, by extension) artifact."""
        if not self.enabled:
            return
        plain = json.loads(json.dumps(_to_plain(data), default=_json_default))
        self._run_call(f"logging {artifact_file}",
                       lambda rid: self._backend.client.log_dict(rid, plain, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.enabled:
            return
        self._run_call(f"logging {artifact_file}",
                       lambda rid: self._backend.client.log_text(rid, text, artifact_file))

    def log_file_reference(self, path: str | Path, key: str) -> None:
        """Record a (big) file by path and sha256 as tags `<key>.path/.sha256/.bytes`; no upload.

        The path is relative to the workspace root when inside it (the DVC output path, valid in
        every clone), so `dvc pull` + the hash find the exact file again.
        """
        if not self.enabled:
            return
        p = Path(path).resolve()
        if not p.is_file():
            self._backend.warn(f"file {p} does not exist; reference {key!r} not logged")
            return
        root = workspace_root()
        shown = p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)
        self.set_tags({f"{key}.path": shown, f"{key}.sha256": file_sha256(p),
                       f"{key}.bytes": p.stat().st_size})

    def log_summary_to_parent(self, metrics: Mapping[str, Any],
                              artifacts: Iterable[str | Path] = (), *,
                              tags: Mapping[str, Any] | None = None,
                              artifact_path: str | None = None, step: int = 0) -> None:
        """Log the pipeline's final metrics (and e.g. metrics.json, drawings) on the parent run.

        The `evaluate` stage calls this on every execution: a stage restored from DVC's cache
        creates no run of its own, so the parent is the one place that always has the summary.
        """
        if not self.enabled or self.parent_run_id is None:
            return
        self._log_metrics(metrics, step, self.parent_run_id)
        if tags:
            self._set_tags(tags, self.parent_run_id)
        for path in artifacts:
            self._log_artifact(path, artifact_path, self.parent_run_id)


def _default_parent_name(stage: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return exp
    if os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT"):
        return f"repro-{stamp}"
    return f"manual-{stage}-{stamp}"


def _user_tag() -> dict[str, str]:
    try:
        return {"mlflow.user": getpass.getuser()}
    except Exception:    # no passwd entry in some containers
        return {}


def search_all_runs(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    """Every active run of the experiment matching `filter_string`, page by page."""
    from mlflow.entities import ViewType
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def _clean_tags(tags: Mapping[str, str]) -> dict[str, str]:
    # mlflow.* keys are MLflow's own and already valid; ours are sanitised.
    return {(k if k.startswith("mlflow.") else sanitize_key(k)): truncate(str(v), MAX_TAG_VAL_LENGTH)
            for k, v in tags.items()}


def _tag_entities(tags: Mapping[str, str]) -> list[Any]:
    from mlflow.entities import RunTag
    return [RunTag(k, v) for k, v in tags.items()]


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)
