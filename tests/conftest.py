"""Test-wide settings: the suite runs tiny shapes on a 2-core CI machine."""
import torch

# Tiny convolutions gain nothing from intra-op threads, and two threads contending with another
# process for 2 cores run 10-100x slower; one thread keeps timings stable.
torch.set_num_threads(1)


def pytest_report_header(config):
    from tests._params import workspace_params_differ
    if workspace_params_differ():
        return ("params.yaml differs from git HEAD (a `dvc exp run -S`?): the tests use the committed "
                "defaults (tests/_params.py)")
    return None
