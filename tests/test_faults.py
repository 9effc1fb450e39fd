"""Faults and bad input at the level users meet them: the stage commands and `dvc repro`.

SIGKILL mid-run then rerun resumes to the same result; a dying tracking server, a full disk or an
unwritable folder never lose finished work; bad input ends with one clear line (exit 2), no
traceback. The unit tests of each module cover the mechanisms; these drive the real commands.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nascore.io import CheckpointError, load_checkpoint
from tests.e2e import Repo, make_repo, set_params

pytestmark = pytest.mark.slow
TIMING = {"epoch_seconds", "images_per_s"}


@pytest.fixture(scope="module")
def proj(tmp_path_factory) -> Repo:
    repo = make_repo(tmp_path_factory.mktemp("faults") / "project")
    repo.env["NASCORE_TRACKING"] = "off"          # tracking has its own tests below
    repo.env["OMP_NUM_THREADS"] = "1"
    set_params(repo, **{"profile": "smoke", "space": "nb201", "search.epochs": 6,
                        "data.synthetic.num_train": 256, "retrain.train.epochs": 4,
                        "retrain.train.deterministic": True, "transfer.train.epochs": 3,
                        "transfer.train.deterministic": True})
    for stage in ("prepare", "search", "derive"):
        repo.stage(stage)
    return repo


def checkpoint_epoch(path: Path) -> int:
    try:
        return int(load_checkpoint(path, kind="search" if path.name == "search.pt" else "train")["epoch"])
    except (CheckpointError, KeyError):
        return -1


def run_and_kill(repo: Repo, stage: str, checkpoint: str, at_least: int = 1) -> int:
    """Start `stage` as DVC would (its outputs deleted first), SIGKILL it once its checkpoint has
    `at_least` epochs; return that epoch."""
    shutil.rmtree(repo.root / "outputs" / stage, ignore_errors=True)
    proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=repo.root, env=repo.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    epoch = -1
    try:
        while time.time() < deadline and proc.poll() is None:
            found = list((repo.root / "scratch" / stage).glob(f"*/{checkpoint}"))
            if found and (epoch := checkpoint_epoch(found[0])) >= at_least:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    return epoch


def history(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in json.loads(path.read_text())]


def test_search_killed_mid_run_resumes_to_the_uninterrupted_result(proj):
    out = proj.root / "outputs" / "search"
    reference = {p: (out / p).read_text() for p in ("alphas.json", "genotype.json")}
    reference_history = history(out / "history.json")
    killed_at = run_and_kill(proj, "search", "search.pt", at_least=2)
    assert not out.exists(), "a killed search publishes nothing"
    assert 2 <= killed_at < 6
    resumed = proj.stage("search")
    assert "resumed from" in resumed.stderr and f"at epoch {killed_at}" in resumed.stderr
    assert {p: (out / p).read_text() for p in reference} == reference
    assert history(out / "history.json") == reference_history


@pytest.mark.parametrize("stage", ["retrain", "transfer_imagenet"])
def test_training_killed_mid_run_resumes_to_the_same_weights(proj, stage):
    params = proj.root / "params.yaml"
    before = params.read_text()
    if stage == "transfer_imagenet":      # NB201 cells have no ImageNet network: a DARTS cell
        set_params(proj, **{"space": "darts", "transfer.genotype": "DARTS_V2"})
    try:
        _kill_and_resume_training(proj, stage)
    finally:
        params.write_text(before)


def _kill_and_resume_training(proj: Repo, stage: str) -> None:
    proj.stage(stage)
    out = proj.root / "outputs" / stage
    reference = torch.load(out / "model.pt", weights_only=True)
    reference_log = (out / "log.csv").read_text()
    killed_at = run_and_kill(proj, stage, "train.pt", at_least=1)
    assert not out.exists()
    proj.stage(stage)
    resumed = torch.load(out / "model.pt", weights_only=True)
    assert killed_at >= 1
    for k, v in reference.items():
        assert torch.equal(v, resumed[k]), k
    assert without_measurements((out / "log.csv").read_text()) == without_measurements(reference_log)


def test_a_retrain_resumes_across_a_change_that_cannot_alter_its_result(proj):
    # progress and eval_every change what a run reports, not what it trains (train.RESUMABLE_CHANGES):
    # the rerun finds the same checkpoint folder instead of starting over beside it
    params = proj.root / "params.yaml"
    before = params.read_text()
    try:
        killed_at = run_and_kill(proj, "retrain", "train.pt", at_least=1)
        set_params(proj, **{"retrain.train.progress": "none", "retrain.train.eval_every": 2})
        rerun = proj.stage("retrain")
        resumed = re.search(r"retrain: resumed from epoch (\d+)", rerun.stderr)
        # (a checkpoint may land between seeing one and the kill)
        assert resumed and int(resumed.group(1)) in (killed_at, killed_at + 1), rerun.stderr
        assert not list((proj.root / "scratch" / "retrain").glob("*/train.pt")), "no orphan left beside it"
    finally:
        params.write_text(before)


def without_measurements(log_csv: str) -> list[dict[str, str]]:
    """A training log's rows without the columns that measure the run rather than the training:
    its timing and its GPU memory."""
    measured = {"epoch_seconds", "images_per_s", "peak_memory_mb", "peak_reserved_mb"}
    rows = list(csv.DictReader(io.StringIO(log_csv)))
    assert rows and measured & set(rows[0]) >= {"epoch_seconds", "images_per_s"}
    return [{k: v for k, v in r.items() if k not in measured} for r in rows]


def test_dvc_repro_after_a_sigkill_of_the_whole_run_resumes(proj, tmp_path):
    """Kill dvc and its stage together (a lost machine), then `dvc repro` again."""
    proj.dvc("repro", "derive")                   # record prepare/search/derive in dvc.lock
    set_params(proj, **{"search.epochs": 7})      # a change: search must rerun
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "search"], cwd=proj.root, env=proj.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, killed = time.time() + 300, False
    while time.time() < deadline and proc.poll() is None:
        found = list((proj.root / "scratch" / "search").glob("*/search.pt"))
        if found and checkpoint_epoch(found[0]) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed, "dvc repro finished before it could be killed"
    again = proj.dvc("repro", "search")
    assert "resumed from" in again.stderr + again.stdout
    status = json.loads(proj.dvc("status", "search", "--json").stdout)
    assert status == {}
    set_params(proj, **{"search.epochs": 6})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_server_dying_mid_run_warns_once_and_the_stage_finishes(proj, tmp_path):
    pytest.importorskip("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1",
         "--default-artifact-root", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.skip("mlflow server did not start")
        env = {**proj.env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
        env.pop("NASCORE_TRACKING")
        stage = subprocess.Popen([sys.executable, "-m", "stages.search"], cwd=proj.root, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and stage.poll() is None:
            found = list((proj.root / "scratch" / "search").glob("*/search.pt"))
            if found and checkpoint_epoch(found[0]) >= 1:
                os.killpg(server.pid, signal.SIGKILL)     # the server dies mid-run
                break
            time.sleep(0.05)
        _, err = stage.communicate(timeout=300)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert stage.returncode == 0, err
    warnings = [line for line in err.splitlines() if "tracking off" in line]
    assert len(warnings) == 1, err
    assert "outputs are unaffected" in warnings[0]
    assert (proj.root / "outputs" / "search" / "genotype.json").exists()


def test_unreachable_tracking_backend_warns_once_and_the_stage_finishes(proj):
    env = {**proj.env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}     # a closed local port
    env.pop("NASCORE_TRACKING")
    result = subprocess.run([sys.executable, "-m", "stages.derive"], cwd=proj.root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "127.0.0.1:9" in line]
    assert len(warnings) == 1, result.stderr
    assert (proj.root / "outputs" / "derive" / "genotype.json").exists()


def run_stage_failing(repo: Repo, stage: str, env: dict | None = None, **kw) -> str:
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo.root, env=env or repo.env,
                            capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith(f"nascore {stage}: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_full_disk_is_a_clear_error_and_publishes_nothing(proj):
    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # EFBIG instead of death, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    out = proj.root / "outputs" / "search"
    shutil.rmtree(out)                                    # as DVC does before running a stage
    message = run_stage_failing(proj, "search", preexec_fn=small_files)
    assert "cannot write" in message and "disk full?" in message
    assert not out.exists() and not list(out.parent.glob(".search.tmp-*"))
    proj.stage("search")                                  # space again: the run completes


@pytest.mark.parametrize("blocked", ["outputs", "outputs/derive", "metrics"])
def test_an_unwritable_output_location_is_a_clear_error_and_leaves_nothing(proj, blocked):
    # (the tests run as root, which permissions do not stop: a file in the way of a folder does)
    target = proj.root / blocked
    moved = target.with_name(target.name + ".bak")
    if target.exists():
        target.rename(moved)
    if blocked == "outputs":
        target.mkdir()                       # outputs/ itself is fine, its stage folder is blocked
        (target / "search").symlink_to(moved / "search")
        (target / "derive").write_text("in the way")
    else:
        target.write_text("in the way")
    try:
        message = run_stage_failing(proj, "derive")
        assert "cannot write" in message
        derive = proj.root / "outputs" / "derive"
        assert not derive.is_dir(), "outputs that look finished were left behind"
        assert not list(derive.parent.glob(".derive.tmp-*"))
    finally:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        if moved.exists():
            moved.rename(target)
        proj.stage("derive")        # the failed run rolled its outputs back: restore them


def test_a_search_whose_metrics_cannot_be_written_keeps_its_checkpoint_and_resumes(proj):
    # the metrics file is a finished stage's last write: if it fails (disk full, metrics/ not
    # writable), the rerun DVC makes must resume from the last epoch, not start over
    metrics = proj.root / "metrics"
    moved = metrics.with_name("metrics.bak")
    metrics.rename(moved)
    metrics.write_text("in the way")
    try:
        shutil.rmtree(proj.root / "outputs" / "search")
        assert "cannot write" in run_stage_failing(proj, "search")
        assert not (proj.root / "outputs" / "search").exists()
        kept = list((proj.root / "scratch" / "search").glob("*/search.pt"))
        assert len(kept) == 1 and checkpoint_epoch(kept[0]) == 6
    finally:
        metrics.unlink()
        moved.rename(metrics)
    rerun = proj.stage("search")
    assert "resumed from" in rerun.stderr and "at epoch 6" in rerun.stderr
    assert not list((proj.root / "scratch" / "search").glob("*/search.pt")), "removed once metrics are written"


def test_a_stage_without_its_inputs_says_which_stage_to_run(proj, tmp_path):
    search = proj.root / "outputs" / "search"
    search.rename(tmp_path / "search")
    try:
        message = run_stage_failing(proj, "derive")
        assert "alphas.json is missing: run the 'search' stage first (dvc repro search)" in message
    finally:
        (tmp_path / "search").rename(search)


def test_non_finite_training_stops_naming_epoch_and_step(proj):
    set_params(proj, **{"search.lr": 1.0e12, "search.grad_clip": 0.0})
    try:
        message = run_stage_failing(proj, "search")
    finally:
        set_params(proj, **{"search.lr": "auto", "search.grad_clip": "auto"})
    assert "non-finite" in message and "epoch 1, step" in message and "no epoch had finished" in message
    assert "search.nonfinite: skip" in message


def test_a_cuda_graph_retrain_without_a_gpu_is_a_one_line_error(proj):
    set_params(proj, **{"retrain.train.cuda_graph": True})
    try:
        message = run_stage_failing(proj, "retrain", env={**proj.env, "NASCORE_DEVICE": "cpu"})
    finally:
        set_params(proj, **{"retrain.train.cuda_graph": "auto"})
    assert "retrain.train.cuda_graph: true needs one CUDA GPU; this run is on cpu" in message
    assert not (proj.root / "outputs" / "retrain").exists() or \
        (proj.root / "metrics" / "retrain.json").exists(), "no half-written retrain output"


def test_a_truncated_or_foreign_checkpoint_in_scratch_is_refused(proj):
    set_params(proj, **{"search.epochs": 3})
    try:
        killed = run_and_kill(proj, "search", "search.pt", at_least=1)
        assert killed >= 1
        ckpt = next((proj.root / "scratch" / "search").glob("*/search.pt"))
        ckpt.write_bytes(ckpt.read_bytes()[:200])
        message = run_stage_failing(proj, "search")
        assert "cannot be loaded safely" in message and "delete it" in message
        ckpt.unlink()
        proj.stage("search")
    finally:
        set_params(proj, **{"search.epochs": 6})


@pytest.mark.parametrize("stage, changes, expected", [
    ("search", {"method": "enas"}, "method='enas' is unknown; allowed: darts"),
    ("search", {"space": "nb301"}, "allowed: darts, nb201, s1, s2, s3, s4"),
    ("prepare", {"dataset": "mnist"}, "allowed: cifar10, cifar100"),
    ("search", {"profile": "quick"}, "allowed: full, smoke"),
    ("search", {"search.epochs": -3}, "search.epochs=-3 must be >= 1"),
    ("search", {"search.partial_channels": 3}, "must divide search.init_channels"),
    ("search", {"search.batch_size": 100000}, "larger than the search's w split"),
    ("search", {"search.grad_clip": -1}, "search.grad_clip=-1 must be >= 0"),
    ("derive", {"space": "darts", "derive.rule": "nb201"}, "cannot derive a darts cell"),
    ("retrain", {"retrain.genotype": "DARTS_V2"}, "is a DARTS cell but space is 'nb201'"),
])
def test_bad_params_end_with_one_clear_line(proj, stage, changes, expected):
    params = proj.root / "params.yaml"
    before = params.read_text()
    try:
        set_params(proj, **changes)
        assert expected in run_stage_failing(proj, stage)
    finally:
        params.write_text(before)


def test_bad_files_end_with_one_clear_line(proj, tmp_path):
    params = proj.root / "params.yaml"
    before = params.read_text()
    code = tmp_path / "genotype.json"
    code.write_text("__import__('os').system('touch /tmp/nascore-pwned')")
    bad_table = tmp_path / "table.csv"
    bad_table.write_text("arch,acc\nfoo,1\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ("retrain", {"retrain.genotype": str(code)}, "must be JSON"),
        ("evaluate", {"evaluate.nb201_table": str(bad_table)}, "missing column"),
        ("prepare", {"profile": "full", "data.root": str(empty), "data.download": False},
         "ImageFolder"),
        ("prepare", {"profile": "full", "data.root": str(tmp_path / "missing"), "data.download": False},
         "data.root"),
    ]
    try:
        for stage, changes, expected in cases:
            params.write_text(before)
            set_params(proj, **changes)
            assert expected in run_stage_failing(proj, stage), (stage, changes)
    finally:
        params.write_text(before)
    assert not Path("/tmp/nascore-pwned").exists()


def test_two_identical_runs_do_not_share_a_checkpoint(proj):
    """A second run with the same params (a duplicated queue entry) is refused while the first
    runs; the lock dies with its process, so a SIGKILLed run never blocks its own rerun."""
    import fcntl
    set_params(proj, **{"search.epochs": 500})          # long enough to still run when #2 starts
    first = subprocess.Popen([sys.executable, "-m", "stages.search"], cwd=proj.root, env=proj.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((proj.root / "scratch" / "search").glob("*/search.pt")):
            time.sleep(0.02)
        message = run_stage_failing(proj, "search")
        assert first.poll() is None, "the first run must still hold the folder"
        assert f"in use by pid {first.pid}" in message and "same params" in message
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        set_params(proj, **{"search.epochs": 6})
    folder = next((proj.root / "scratch" / "search").glob("*/search.pt")).parent
    with open(folder / ".lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)    # free again: no stale lock
    shutil.rmtree(folder)


def test_stage_commands_take_no_arguments_and_say_so(proj):
    out = proj.root / "outputs" / "derive" / "genotype.json"
    before = out.stat().st_mtime_ns
    helped = proj.run(sys.executable, "-m", "stages.derive", "--help")
    assert "params.yaml" in helped.stdout and "dvc repro derive" in helped.stdout
    stray = proj.run(sys.executable, "-m", "stages.search", "--epochs", "3", check=False)
    assert stray.returncode == 2 and "unrecognized arguments: --epochs 3" in stray.stderr
    assert out.stat().st_mtime_ns == before, "neither ran the stage"
