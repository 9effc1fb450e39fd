"""nascore/graphs.py: the CUDA-graph capture the search loop and `train` share (GPU only)."""
import pytest
import torch

from nascore.graphs import cuda_graph, side_stream


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_an_epochs_capture_does_not_stack_on_the_last_ones_memory():
    # what the search loop and `train` do once per epoch: warm-up steps on a side stream, a
    # capture, replays, then the epoch's graph is dropped
    device = torch.device("cuda")
    w = torch.randn(2048, 2048, device=device)
    out = torch.zeros((), device=device)

    def step() -> None:
        out.copy_((w @ w).relu().sum())          # 16 MB temporaries, freed within the step

    reserved = []
    for _ in range(4):
        with side_stream(device):
            step()
        graph = cuda_graph(step)
        graph.replay()
        torch.cuda.synchronize()
        expected = (w @ w).relu().sum()
        torch.testing.assert_close(out, expected)
        del graph
        reserved.append(torch.cuda.memory_reserved(device))
    # each epoch's side-stream blocks and graph pool are new: unless the capture releases the
    # cached blocks, nothing reuses the last epoch's and the reserved memory grows per epoch
    assert reserved[-1] <= reserved[0] + 4 * 2**20, [r / 2**20 for r in reserved]
