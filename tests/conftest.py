"""Test-wide settings: the suite runs tiny shapes on a 2-core CI machine."""
from pathlib import Path

import pytest
import torch

# Tiny convolutions gain nothing from intra-op threads, and two threads contending with another
# process for 2 cores run 10-100x slower; one thread keeps timings stable.
torch.set_num_threads(1)

# xdist hands whole files to its workers in collection order (pyproject.toml: `--dist loadfile
# --no-loadscope-reorder`). The files that take minutes go first so that the short ones fill the
# end of the run. The two DVC sweep files (compare, selection) go to different workers at
# different times: both idle while DVC's queue workers start and stop, and a file that computes
# beside them uses that time. Seconds each file took (2-core VM, 2026-12-06's seventeenth
# session): fused 493, faults 296, bench 189, compare 187, selection 160, search 118,
# pipeline_e2e 94, train 60, op_schedules 48, sweeps_plain 47; any other file under 30. By xdist's own order (most tests first) a
# sweep file came last: 831 s, 173 idle core-seconds; in this order 800 s, 75.
LONG_FILES_FIRST = ("test_compare.py", "test_fused.py", "test_faults.py", "test_selection.py",
                    "test_bench.py", "test_search.py", "test_pipeline_e2e.py", "test_sweeps_plain.py",
                    "test_op_schedules.py", "test_train.py")


def pytest_collection_modifyitems(session, config, items):
    here = Path(__file__).parent
    gone = [name for name in LONG_FILES_FIRST if not (here / name).is_file()]
    if gone:      # a renamed file would silently lose its place
        raise pytest.UsageError(f"tests/conftest.py LONG_FILES_FIRST names files that do not exist: {gone}")
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    # stable: a file's own tests keep their order; files not listed keep theirs, after the long ones
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_report_header(config):
    from tests._params import workspace_params_differ
    if workspace_params_differ():
        return ("params.yaml differs from git HEAD (a `dvc exp run -S`?): the tests use the committed "
                "defaults (tests/_params.py)")
    return None
