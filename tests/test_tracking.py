"""nascore.tracking: parent/child runs across processes, root and key rules, failing soft.

The MLflow store is a real SQLite file. Creating one costs ~7 s (alembic migrations), so one is
made per session and copied or shared; tests stay apart by experiment name and run key.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from nascore import tracking
from nascore.tracking import (TRUNCATION_MARKER, Tracker, TrackingConfig, flatten_params,
                              project_root, resolve_tracking_uri, run_key, sanitize_key)

REPO = Path(__file__).resolve().parents[1]
mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

DVC_ENV = ("DVC_EXP_NAME", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_BASELINE_REV")


WORKER = textwrap.dedent("""
    import sys
    from nascore.tracking import Tracker
    with Tracker.start_stage("search", params={"worker": sys.argv[1]}) as tr:
        for epoch in range(5):
            tr.log_metrics({"loss": 1.0 / (epoch + 1)}, step=epoch)
    print("ENABLED", tr.enabled)
""")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "NASCORE_"))}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


@pytest.fixture(scope="session")
def fresh_store_by_parallel_workers(tmp_path_factory: pytest.TempPathFactory
                                    ) -> tuple[Path, list[tuple[int, str, str]]]:
    """A new project's store, created the way `dvc queue start -j 2` creates it: by two stage
    processes starting at once. Returns (db path, [(returncode, stdout, stderr)] per worker).

    Creating a store costs seconds (alembic migrations), so the other tests reuse this one.
    """
    root = tmp_path_factory.mktemp("store")
    env = _clean_env(NASCORE_PROJECT_ROOT=str(root), MLFLOW_EXPERIMENT_NAME="parallel")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i)], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    return root / "mlflow.db", [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


@pytest.fixture(scope="session")
def template_db(fresh_store_by_parallel_workers: tuple[Path, list]) -> Path:
    """A migrated MLflow SQLite store (its runs are in experiment "parallel", out of the way)."""
    return fresh_store_by_parallel_workers[0]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean tracking environment: no inherited DVC/MLflow variables, no proxy for 127.0.0.1."""
    for name in (*DVC_ENV, "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "NASCORE_RUN_KEY",
                 "NASCORE_TRACKING", "NASCORE_PROJECT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NASCORE_PROJECT_ROOT", str(tmp_path))
    return monkeypatch


@pytest.fixture
def shared_store(env: pytest.MonkeyPatch, template_db: Path) -> str:
    """Point tracking at the session store under a fresh experiment name; returns the URI."""
    uri = f"sqlite:///{template_db}"
    env.setenv("MLFLOW_TRACKING_URI", uri)
    env.setenv("MLFLOW_EXPERIMENT_NAME", f"t-{uuid.uuid4().hex[:8]}")
    return uri


def _runs(uri: str, experiment: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=100)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "nascore.tracking" and r.levelno >= logging.WARNING]


# --- a pipeline execution = one parent, a child per stage ---------------------------------------
def test_two_stages_one_parent_default_store(env: pytest.MonkeyPatch, tmp_path: Path,
                                             template_db: Path) -> None:
    shutil.copy(template_db, tmp_path / "mlflow.db")     # the default store, already migrated
    env.setenv("NASCORE_RUN_KEY", "exp-a@host:1:2")
    env.setenv("DVC_EXP_NAME", "tidy-fern")
    tags = {"method": "darts", "space": "darts", "dataset": "cifar10", "seed": 0, "git_commit": "abc123"}
    long_value = "x" * 7000

    with Tracker.start_stage("search", tags=tags,
                             params={"search": {"epochs": 2, "lr": 0.025, "note": long_value},
                                     "odd key!": True}) as tr:
        assert tr.enabled and tr.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
        for epoch in range(2):
            tr.log_metrics({"train/loss": 1.0 / (epoch + 1), "param_free_ops": epoch}, step=epoch)
        (tmp_path / "genotype.json").write_text('{"type": "darts_cell"}')
        tr.log_artifact(tmp_path / "genotype.json")
        tr.log_dict({"alphas": [[0.5, 0.5]]}, "alphas/epoch_1.json")
        search_parent = tr.parent_run_id
    with Tracker.start_stage("derive", tags=tags, params={"derive": {"rule": "darts"}}) as tr:
        assert tr.parent_run_id == search_parent
        tr.log_text("normal: ...", "genotype.txt")

    client, runs = _runs(f"sqlite:///{tmp_path}/mlflow.db", "nascore")
    parents = [r for r in runs if r.data.tags.get("nascore.role") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("nascore.role") == "stage"]
    assert len(runs) == 3 and len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.run_name == "tidy-fern" and parent.info.status == "FINISHED"
    assert parent.data.tags["method"] == "darts" and parent.data.tags["seed"] == "0"
    assert parent.data.tags["mlflow.source.git.commit"] == "abc123"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_stage = {c.data.tags["nascore.stage"]: c for c in children}
    search = by_stage["search"]
    assert search.info.status == "FINISHED"
    assert search.data.params["search.epochs"] == "2" and search.data.params["search.lr"] == "0.025"
    assert search.data.params["odd key_"] == "true"
    note = search.data.params["search.note"]
    assert len(note) == tracking.MAX_PARAM_VAL_LENGTH and note.endswith(TRUNCATION_MARKER)
    history = client.get_metric_history(search.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 1.0), (1, 0.5)]
    artifacts = {a.path for a in client.list_artifacts(search.info.run_id)}
    assert {"genotype.json", "params.json", "alphas"} <= artifacts
    # artifacts live at the project's absolute path, whatever the working directory was
    assert (tmp_path / "mlartifacts" / search.info.run_id / "artifacts" / "genotype.json").is_file()
    assert by_stage["derive"].data.params == {"derive.rule": "darts"}


def test_different_run_keys_give_different_parents(env: pytest.MonkeyPatch, shared_store: str) -> None:
    parents = []
    for key in ("inv-1", "inv-2"):
        env.setenv("NASCORE_RUN_KEY", key)
        with Tracker.start_stage("search", tags={"method": "darts"}) as tr:
            parents.append(tr.parent_run_id)
    assert parents[0] and parents[1] and parents[0] != parents[1]
    _, runs = _runs(shared_store, os.environ["MLFLOW_EXPERIMENT_NAME"])
    assert sorted(r.data.tags["nascore.run_key"] for r in runs
                  if r.data.tags["nascore.role"] == "pipeline") == ["inv-1", "inv-2"]


def test_summary_on_parent_and_failed_stage(env: pytest.MonkeyPatch, shared_store: str,
                                           tmp_path: Path) -> None:
    env.setenv("NASCORE_RUN_KEY", "summary-key")
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text('{"test_acc": 97.1}')
    with Tracker.start_stage("evaluate", tags={"method": "pc_darts"}) as tr:
        tr.log_summary_to_parent({"test_acc": 97.1, "params_m": 3.6}, [metrics_file],
                                 tags={"nb201.cifar10": 93.76})
        parent = tr.parent_run_id
    client = MlflowClient(shared_store)
    run = client.get_run(parent)
    assert run.data.metrics == {"test_acc": 97.1, "params_m": 3.6}
    assert run.data.tags["nb201.cifar10"] == "93.76"
    assert [a.path for a in client.list_artifacts(parent)] == ["metrics.json"]

    with pytest.raises(RuntimeError, match="boom"):          # the stage's error is not swallowed
        with Tracker.start_stage("retrain") as tr:
            raise RuntimeError("boom")
    assert client.get_run(tr.run_id).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FAILED"    # same key: the parent shows it


def test_file_reference_records_path_and_hash_without_upload(env: pytest.MonkeyPatch, shared_store: str,
                                                             tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"\x00weights" * 1000)
    env.setenv("NASCORE_RUN_KEY", "ref-key")
    with Tracker.start_stage("retrain") as tr:
        tr.log_file_reference(ckpt, "checkpoint")
        tr.log_artifact(tmp_path / "missing.pt")             # caller error: warned, tracking stays on
        assert tr.enabled
    run = MlflowClient(shared_store).get_run(tr.run_id)
    assert run.data.tags["checkpoint.sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert run.data.tags["checkpoint.bytes"] == str(ckpt.stat().st_size)
    assert run.data.tags["checkpoint.path"].endswith("model.pt")
    assert MlflowClient(shared_store).list_artifacts(tr.run_id) == []


# --- failing soft --------------------------------------------------------------------------------
def test_unreachable_server_warns_once_and_stage_completes(env: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # a closed local port
    caplog.set_level(logging.WARNING, logger="nascore.tracking")
    start = time.monotonic()
    done = False
    with Tracker.start_stage("search", tags={"method": "darts"}, params={"a": 1}) as tr:
        for epoch in range(3):
            tr.log_metrics({"loss": 1.0}, step=epoch)
        tr.log_text("x", "x.txt")
        tr.log_summary_to_parent({"acc": 1.0})
        done = True
    assert done and not tr.enabled and tr.run_id is None
    assert time.monotonic() - start < 20
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "http://127.0.0.1:9" in warnings[0] and "reach" in warnings[0]


def test_mlflow_not_installed_warns_once(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["mlflow"] = None          # what `import mlflow` sees when it is not installed
        from nascore.tracking import Tracker
        with Tracker.start_stage("search", tags={"method": "darts"}, params={"a": 1}) as tr:
            tr.log_metrics({"loss": 1.0}, step=0)
            tr.log_file_reference(sys.executable, "python")
            print("BODY DONE", tr.enabled)
    """)
    env = _clean_env(NASCORE_PROJECT_ROOT=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "BODY DONE False" in out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "MLflow" in lines[0] and "pip install mlflow" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_tracking_off_is_silent(env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    env.setenv("NASCORE_TRACKING", "off")
    with Tracker.start_stage("search", params={"a": 1}) as tr:
        tr.log_metrics({"loss": 1.0}, step=0)
    assert not tr.enabled and _warnings(caplog) == []
    assert not Tracker.disabled().enabled


def test_an_unknown_tracking_setting_is_named_and_tracking_stays_on(env: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    env.setenv("NASCORE_TRACKING", "disable")            # a typo of `disabled`
    assert TrackingConfig.from_env().enabled
    assert _warnings(caplog) == ["NASCORE_TRACKING='disable' is neither on (1/enabled/on/true/yes) nor "
                                 "off (0/disabled/false/no/off): tracking stays on"]
    caplog.clear()
    env.setenv("NASCORE_TRACKING", "Yes")
    assert TrackingConfig.from_env().enabled and _warnings(caplog) == []


def test_locked_database_is_waited_out(env: pytest.MonkeyPatch, shared_store: str,
                                      template_db: Path) -> None:
    """Another writer holds an exclusive lock for ~1 s; the log call succeeds once it is released."""
    env.setenv("NASCORE_RUN_KEY", "lock-key")
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        con = sqlite3.connect(template_db, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(5)
        time.sleep(1.0)
        con.execute("COMMIT")
        con.close()

    with Tracker.start_stage("search") as tr:
        holder = threading.Thread(target=hold)
        holder.start()
        assert locked.wait(5)
        release.set()
        start = time.monotonic()
        tr.log_metrics({"loss": 0.5}, step=3)
        waited = time.monotonic() - start
        holder.join()
        assert tr.enabled
    assert waited > 0.5
    history = MlflowClient(shared_store).get_metric_history(tr.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]


def test_lock_errors_are_retried_with_backoff_then_given_up(env: pytest.MonkeyPatch, shared_store: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """MLflow surfaces a lock that outlives SQLite's busy timeout as an error: we retry it."""
    caplog.set_level(logging.WARNING, logger="nascore.tracking")
    env.setenv("NASCORE_RUN_KEY", "retry-key")
    with Tracker.start_stage("search") as tr:
        backend = tr._backend
        fake_now = [0.0]
        sleeps: list[float] = []

        def fake_sleep(s: float) -> None:
            sleeps.append(s)
            fake_now[0] += s

        backend.sleep, backend.clock = fake_sleep, lambda: fake_now[0]
        real = backend.client.log_batch
        failures = [3]

        def flaky(*args, **kwargs):
            if failures[0] > 0:
                failures[0] -= 1
                raise MlflowException("(sqlite3.OperationalError) database is locked")
            return real(*args, **kwargs)

        backend.client.log_batch = flaky
        tr.log_metrics({"loss": 0.25}, step=1)
        assert backend.retries == 3 and tr.enabled and _warnings(caplog) == []
        assert len(sleeps) == 3 and sleeps[2] > sleeps[0]     # exponential, jittered by +-50%

        failures[0] = 10 ** 6                                 # a lock that never goes away
        first = len(sleeps)
        tr.log_metrics({"loss": 0.125}, step=2)
        assert not tr.enabled
        # one call waits at most its budget, however the jitter falls
        assert tr.config.retry_budget_s - 4.0 * 1.5 <= sum(sleeps[first:]) <= tr.config.retry_budget_s
        tr.log_metrics({"loss": 0.0}, step=3)                 # off now: no more calls, no more warnings
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "locked" in warnings[0] and "mlflow server" in warnings[0]
    history = MlflowClient(shared_store).get_metric_history(tr.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.25)]


def test_parallel_workers_on_a_fresh_store(fresh_store_by_parallel_workers: tuple[Path, list]) -> None:
    """MLflow migrates a new SQLite database without a lock ("table ... already exists" when two
    workers start together); the tracker serialises store creation, the experiment is made once."""
    db, results = fresh_store_by_parallel_workers
    for returncode, out, err in results:
        assert returncode == 0 and "ENABLED True" in out and err.strip() == "", err
    client, runs = _runs(f"sqlite:///{db}", "parallel")
    assert [e.name for e in client.search_experiments()].count("parallel") == 1
    stages = [r for r in runs if r.data.tags["nascore.role"] == "stage"]
    assert len(runs) == 4 and sorted(r.data.params["worker"] for r in stages) == ["0", "1"]
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 5 for r in stages)


# --- where the store is, and which runs belong together -----------------------------------------
def test_project_root_rules(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / ".dvc" / "tmp" / "exps" / "tmpab12cd").mkdir(parents=True)
    (root / ".dvc" / "tmp" / "exps" / "standalone" / "tmpxyz" / "stages").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "sub" / "deeper").mkdir(parents=True)
    env.delenv("NASCORE_PROJECT_ROOT")
    assert project_root(root / ".dvc" / "tmp" / "exps" / "tmpab12cd") == root          # queue
    assert project_root(root / ".dvc/tmp/exps/standalone/tmpxyz/stages") == root       # --temp
    assert project_root(root / "sub" / "deeper") == root
    env.chdir(root / ".dvc" / "tmp" / "exps" / "tmpab12cd")
    assert project_root() == root
    assert resolve_tracking_uri(project_root()) == f"sqlite:///{root}/mlflow.db"
    env.setenv("MLFLOW_TRACKING_URI", "sqlite:///custom/m.db")        # relative: anchored at root
    assert resolve_tracking_uri(root) == f"sqlite:///{root}/custom/m.db"
    env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(root) == "http://127.0.0.1:5000"
    assert TrackingConfig.from_env().artifact_location is None            # the server decides
    env.setenv("NASCORE_PROJECT_ROOT", str(tmp_path / "elsewhere"))
    assert project_root(root) == (tmp_path / "elsewhere").resolve()


def test_run_key_rules(env: pytest.MonkeyPatch) -> None:
    a, b = run_key(), run_key()
    assert a.startswith("manual@") and a != b                 # by hand: a parent per process
    env.setenv("DVC_EXP_NAME", "sassy-wont")
    assert "sassy-wont" in run_key()
    env.setenv("NASCORE_RUN_KEY", "my key/1")
    assert run_key() == "my_key_1"
    assert tracking._is_dvc_cmdline(["/venv/bin/python3", "/venv/bin/dvc", "repro"])
    assert tracking._is_dvc_cmdline(["dvc", "exp", "exec-run", "--infofile", "x"])
    assert tracking._is_dvc_cmdline(["python", "-m", "dvc", "repro"])
    assert not tracking._is_dvc_cmdline(["python", "stages/search.py", "--dvc"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_run_key_shared_by_stages_of_one_dvc_invocation(tmp_path: Path) -> None:
    """A fake `dvc` that runs two 'stages' as child processes, invoked twice."""
    fake = tmp_path / "dvc"
    fake.write_text(textwrap.dedent("""
        import subprocess, sys
        code = "from nascore.tracking import run_key; print(run_key())"
        for _ in range(2):
            subprocess.run([sys.executable, "-c", code], check=True)
    """))
    env = _clean_env()

    def invocation() -> list[str]:
        out = subprocess.run([sys.executable, str(fake)], capture_output=True, text=True, env=env,
                             check=True, timeout=60)
        return out.stdout.split()

    first, second = invocation(), invocation()
    assert len(first) == 2 and first[0] == first[1] and first[0].startswith("repro@")
    assert second[0] == second[1] and second[0] != first[0]


HANGING_STAGE = textwrap.dedent("""
    import sys, time
    from nascore.tracking import Tracker
    with Tracker.start_stage("search", params={"who": sys.argv[1]}) as tr:
        print(tr.run_id, tr.parent_run_id, flush=True)
        time.sleep(600)
""")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_runs_of_a_killed_process_are_closed_by_the_next_stage(env: pytest.MonkeyPatch,
                                                               shared_store: str) -> None:
    """SIGKILL leaves a stage run and its parent RUNNING; the next stage closes them as KILLED and
    leaves a live process's runs alone."""
    procs = {}
    for who in ("killed", "alive"):
        penv = _clean_env(MLFLOW_TRACKING_URI=shared_store, NASCORE_PROJECT_ROOT=os.environ["NASCORE_PROJECT_ROOT"],
                          MLFLOW_EXPERIMENT_NAME=os.environ["MLFLOW_EXPERIMENT_NAME"], NASCORE_RUN_KEY=who)
        procs[who] = subprocess.Popen([sys.executable, "-c", HANGING_STAGE, who], env=penv, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ids = {who: p.stdout.readline().split() for who, p in procs.items()}
        assert all(len(v) == 2 for v in ids.values()), {w: p.stderr.read() for w, p in procs.items()}
        procs["killed"].kill()
        procs["killed"].wait(timeout=30)
        client = MlflowClient(shared_store)
        assert client.get_run(ids["killed"][0]).info.status == "RUNNING"      # nobody closed it
        # a run of another container on this kernel (same host name and boot id, another PID
        # namespace): its pid means nothing here, so it is left alone
        here = tracking.process_identity(os.getpid())
        host, boot, _ns, _pid, _start = here.split(":")
        exp_id = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"]).experiment_id
        foreign = client.create_run(exp_id, tags={"nascore.owner": f"{host}:{boot}:1:999999:1"}).info.run_id
        env.setenv("NASCORE_RUN_KEY", "the-rerun")
        with Tracker.start_stage("search"):
            pass
        for run_id in ids["killed"]:                                           # stage and parent
            run = client.get_run(run_id)
            assert run.info.status == "KILLED" and "was gone" in run.data.tags["nascore.reaped"]
        for run_id in (*ids["alive"], foreign):
            assert client.get_run(run_id).info.status == "RUNNING"
    finally:
        for p in procs.values():
            p.kill()
            p.wait(timeout=30)


def test_params_flattening_and_key_sanitising() -> None:
    from dataclasses import dataclass

    @dataclass
    class Search:
        epochs: int = 50
        ops: tuple = ("none", "skip_connect")

    flat = flatten_params({"search": Search(), "seed": 0, "data": {"root": Path("/d"), "x": None},
                           "empty": {}})
    assert flat == {"search.epochs": "50", "search.ops": '["none", "skip_connect"]', "seed": "0",
                    "data.root": "/d", "data.x": "null", "empty": "{}"}
    assert sanitize_key("a/../b c:d?") == "a/b c_d_"
    assert sanitize_key("/x//y/") == "x/y"
    assert sanitize_key("k" * 300) == "k" * 250
    assert tracking.truncate("abcdef", 100) == "abcdef"
