"""nascore.plots: every figure is a real, non-blank PNG; growing op sets and bad input handled."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nascore import plots

DARTS_OPS = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
             "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def softmax_rows(rng: np.random.Generator, edges: int, ops: int) -> np.ndarray:
    x = np.exp(rng.normal(size=(edges, ops)))
    return x / x.sum(axis=1, keepdims=True)


def assert_real_png(path: Path) -> None:
    from matplotlib.image import imread
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(pixels[..., :3].std()) > 0.02                # not a blank canvas


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_alpha_heatmap(tmp_path: Path, rng: np.random.Generator) -> None:
    probs = {"normal": softmax_rows(rng, 14, 8), "reduce": softmax_rows(rng, 14, 8)}
    out = plots.plot_alpha_heatmap(probs, DARTS_OPS, tmp_path / "a" / "alphas.png", "epoch 50")
    assert out == tmp_path / "a" / "alphas.png"
    assert_real_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["alphas.png"]      # no temp files left


def test_alpha_heatmap_per_edge_op_sets(tmp_path: Path, rng: np.random.Generator) -> None:
    """RobustDARTS-style spaces: every edge has its own two ops; columns are their union."""
    per_edge = [[DARTS_OPS[e % 8], DARTS_OPS[(e + 3) % 8]] for e in range(14)]
    out = plots.plot_alpha_heatmap({"normal": softmax_rows(rng, 14, 2)}, {"normal": per_edge},
                                   tmp_path / "s1.png")
    assert_real_png(out)


def test_alpha_evolution_with_growing_op_set(tmp_path: Path, rng: np.random.Generator) -> None:
    history, names = [], []
    for epoch in range(9):                     # OPP-DARTS-like: 3 ops, then one more every 2 epochs
        cols = DARTS_OPS[:min(8, 3 + epoch // 2)]
        history.append({"normal": softmax_rows(rng, 14, len(cols)),
                        "reduce": softmax_rows(rng, 14, len(cols))})
        names.append({"normal": cols, "reduce": cols})
    assert_real_png(plots.plot_alpha_evolution(history, names, tmp_path / "evo.png"))

    # the per-epoch dicts of nascore.diagnostics.collapse_diagnostics work as they are
    diag = [{"alphas": {"cell": softmax_rows(rng, 6, 3 + (t > 2)).tolist()},
             "op_names": {"cell": [["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3"][:3 + (t > 2)]] * 6}}
            for t in range(5)]
    assert_real_png(plots.plot_alpha_evolution(diag, None, tmp_path / "evo201.png"))

    with pytest.raises(ValueError, match="op names of each epoch"):
        plots.plot_alpha_evolution(history, DARTS_OPS, tmp_path / "bad.png")


def test_collapse_training_and_distribution(tmp_path: Path, rng: np.random.Generator) -> None:
    out = plots.plot_collapse_curves({"darts": [0, 1, 2, 4, 6, 7], "pc_darts": [0, 1, 1, 2, 2, 2],
                                      "opp_darts": [1, 1, 2, 1, 1, 1]}, tmp_path / "collapse.png")
    assert_real_png(out)
    history = [{"epoch": e, "train_loss": 2.0 / (e + 1), "valid_loss": 2.2 / (e + 1),
                "train_acc": 40 + 5 * e, "valid_acc": 38 + 5 * e} for e in range(8)]
    history[3].pop("valid_acc")                                 # a gap, not a crash
    assert_real_png(plots.plot_training_curves(
        history, ["train_loss", "valid_loss", "train_acc", "valid_acc", "lr"], tmp_path / "train.png"))
    accs = np.clip(rng.normal(85, 5, 15625), 10, 94.4)
    assert_real_png(plots.plot_distribution_with_points(
        accs, {"darts": [54.3, 54.3], "pc_darts": [93.1, 92.8]}, tmp_path / "nb201.png",
        "CIFAR-10 test accuracy (%)"))


def test_collapse_curves_count_epochs_from_one_like_the_search_log() -> None:
    fig = plots.collapse_figure({"darts, seed 1 on nb201": [2, 3, 4]}, title="t")
    [line] = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [2, 3, 4]
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "darts, seed 1 on nb201"
    [line] = plots.collapse_figure({"x": [1.0]}, first_epoch=5).axes[0].get_lines()
    assert list(line.get_xdata()) == [5]


@pytest.mark.parametrize("call", [
    lambda p: plots.plot_alpha_heatmap({}, DARTS_OPS, p),
    lambda p: plots.plot_alpha_evolution([], DARTS_OPS, p),
    lambda p: plots.plot_collapse_curves({}, p),
    lambda p: plots.plot_collapse_curves({"darts": []}, p),
    lambda p: plots.plot_training_curves([], ["loss"], p),
    lambda p: plots.plot_training_curves([{"epoch": 0, "loss": 1.0}], ["acc"], p),
    lambda p: plots.plot_distribution_with_points([], {"darts": [1.0]}, p, "acc"),
    lambda p: plots.plot_alpha_heatmap({"normal": np.ones((14, 8)) / 8}, DARTS_OPS[:7], p),
])
def test_empty_or_mismatched_input_is_a_clear_error(tmp_path: Path, call) -> None:
    with pytest.raises(ValueError):
        call(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
