"""Figures of a search: α heat-maps, α evolution, collapse curves, training curves, distributions.

Figures are built with matplotlib's object API (`Figure` + the Agg canvas), never `pyplot`: no
backend is switched, no global figure registry fills up across epochs, and importing this module
changes nothing. Every PNG is written atomically (`nascore.io.atomic_path`), so a crash mid-save
leaves the previous figure. Each function returns the path it wrote; empty input is a ValueError.

Op names (`op_names`) may be given as
- one list of op names shared by every edge of every cell type: `["none", "skip_connect", ...]`;
- per cell type, a list shared by its edges: `{"normal": [...], "reduce": [...]}`;
- per cell type and edge (spaces whose edges have different op sets, e.g. RobustDARTS S1, and the
  form `nascore.diagnostics.collapse_diagnostics` returns): `{"normal": [[...], ...], ...}`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .genotype import DARTS_NUM_EDGES, DARTS_STEPS, NB201_EDGES
from .io import atomic_path

OpNames = Union[Sequence[str], Mapping[str, Union[Sequence[str], Sequence[Sequence[str]]]]]
DPI = 120
ANNOTATE_MAX_CELLS = 160      # a 14-edge x 8-op DARTS panel (112) is still readable annotated


# --- helpers ------------------------------------------------------------------------------------
def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)                           # Agg for this figure only; no global backend
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _as_matrix(value: Any, where: str) -> np.ndarray:
    if hasattr(value, "detach"):                   # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=float)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{where}: expected a non-empty (edges, ops) matrix, got shape {arr.shape}")
    return arr


def _is_names(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and all(isinstance(n, str) for n in x)


def _edge_names(spec: OpNames, cell: str, num_edges: int, num_ops: int) -> list[list[str]]:
    """Op names per edge of `cell`, checked against its (edges, ops) matrix."""
    if isinstance(spec, Mapping):
        if cell not in spec:
            raise ValueError(f"op names missing for cell type {cell!r}; have {sorted(spec)}")
        spec = spec[cell]
    if _is_names(spec):
        per_edge = [list(spec)] * num_edges
    elif isinstance(spec, Sequence) and all(_is_names(e) for e in spec):
        per_edge = [list(e) for e in spec]
    else:
        raise ValueError(f"op names for {cell!r} must be a list of names or one list per edge")
    if len(per_edge) != num_edges or any(len(e) != num_ops for e in per_edge):
        raise ValueError(f"op names for {cell!r} do not match its alpha matrix ({num_edges} edges x "
                         f"{num_ops} ops); with an op set that grows during search, pass the op "
                         f"names of each epoch")
    return per_edge


def _union(per_edge: Sequence[Sequence[str]], into: list[str] | None = None) -> list[str]:
    names = into if into is not None else []
    for ops in per_edge:
        for op in ops:
            if op not in names:
                names.append(op)
    return names


def edge_labels(num_edges: int) -> list[str]:
    """Readable edge names: DARTS `n0<-c(k-2)`, NB201 `1<-0`, else the edge index."""
    if num_edges == DARTS_NUM_EDGES:
        inputs = ["c(k-2)", "c(k-1)"] + [f"n{i}" for i in range(DARTS_STEPS)]
        return [f"n{node}←{inputs[j]}" for node in range(DARTS_STEPS) for j in range(node + 2)]
    if num_edges == len(NB201_EDGES):
        return [f"{to}←{frm}" for to, frm in NB201_EDGES]
    return [f"e{e}" for e in range(num_edges)]


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


# --- α heat-map ---------------------------------------------------------------------------------
def plot_alpha_heatmap(probs: Mapping[str, Any], op_names: OpNames, path: str | Path,
                       title: str | None = None) -> Path:
    """One panel per cell type: softmax(α) as edges x ops; values printed when the panel is small.

    Edges whose op sets differ get the union of ops as columns; an op not on an edge is left blank.
    """
    if not probs:
        raise ValueError("plot_alpha_heatmap: no cell types given (probs is empty)")
    panels = []
    for cell, value in probs.items():
        mat = _as_matrix(value, f"alphas of {cell!r}")
        per_edge = _edge_names(op_names, cell, *mat.shape)
        cols = _union(per_edge)
        grid = np.full((mat.shape[0], len(cols)), np.nan)
        for e, ops in enumerate(per_edge):
            for k, op in enumerate(ops):
                grid[e, cols.index(op)] = mat[e, k]
        panels.append((cell, grid, cols))

    width = sum(1.2 + 0.75 * len(cols) for _, _, cols in panels) + 1.0
    height = 1.6 + 0.32 * max(g.shape[0] for _, g, _ in panels)
    fig = Figure(figsize=(max(width, 5.0), max(height, 3.0)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    vmax = max(float(np.nanmax(g)) if np.isfinite(g).any() else 1.0 for _, g, _ in panels)
    image = None
    for ax, (cell, grid, cols) in zip(axes, panels):
        masked = np.ma.masked_invalid(grid)
        image = ax.imshow(masked, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                          interpolation="nearest")
        ax.set_facecolor("0.85")                   # ops absent on an edge show as grey
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(grid.shape[0]), edge_labels(grid.shape[0]), fontsize=8)
        ax.set_title(cell)
        if grid.size <= ANNOTATE_MAX_CELLS:
            for (e, k), v in np.ndenumerate(grid):
                if math.isfinite(v):
                    ax.text(k, e, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 * vmax else "white")
    fig.colorbar(image, ax=list(axes), label="softmax(α)", shrink=0.9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --- α evolution --------------------------------------------------------------------------------
def _epoch_entry(entry: Mapping[str, Any], names: Any) -> tuple[Mapping[str, Any], Any]:
    """(alphas per cell, op names) of epoch t; accepts a `collapse_diagnostics` dict as the entry."""
    if "alphas" in entry and isinstance(entry["alphas"], Mapping):
        return entry["alphas"], entry.get("op_names", names)
    return entry, names


def plot_alpha_evolution(history: Sequence[Mapping[str, Any]], op_names: Any, path: str | Path,
                         title: str | None = None, epochs: Sequence[float] | None = None) -> Path:
    """Per op, the mean softmax weight over the edges that offer it, vs epoch; a panel per cell type.

    `op_names` is one spec for every epoch, or a list with one spec per epoch (a dict per epoch)
    for op sets that grow during search (OPP-DARTS); an epoch's entry may also be the dict of
    `collapse_diagnostics` (with "alphas" and "op_names"), and `op_names` then None. An op not yet
    in the search at an epoch is NaN there: its line starts when the op enters.
    """
    if not history:
        raise ValueError("plot_alpha_evolution: the history is empty (no epochs to plot)")
    per_epoch = (isinstance(op_names, Sequence) and not isinstance(op_names, str)
                 and len(op_names) == len(history) and all(isinstance(x, Mapping) for x in op_names))
    cells: list[str] = []
    ops: dict[str, list[str]] = {}
    means: list[dict[str, dict[str, float]]] = []          # epoch -> cell -> op -> mean weight
    for t, raw in enumerate(history):
        alphas, names = _epoch_entry(raw, op_names[t] if per_epoch else op_names)
        if names is None:
            raise ValueError(f"plot_alpha_evolution: no op names for epoch {t}")
        row: dict[str, dict[str, float]] = {}
        for cell, value in alphas.items():
            mat = _as_matrix(value, f"epoch {t}, alphas of {cell!r}")
            per_edge = _edge_names(names, cell, *mat.shape)
            if cell not in cells:
                cells.append(cell)
            _union(per_edge, ops.setdefault(cell, []))
            sums: dict[str, list[float]] = {}
            for e, edge_ops in enumerate(per_edge):
                for k, op in enumerate(edge_ops):
                    sums.setdefault(op, []).append(mat[e, k])
            row[cell] = {op: float(np.mean(v)) for op, v in sums.items()}
        means.append(row)
    xs = np.asarray(epochs if epochs is not None else range(len(history)), dtype=float)
    if len(xs) != len(history):
        raise ValueError(f"{len(xs)} epoch labels for {len(history)} history entries")

    all_ops = _union(ops.values())
    colors = _colors(all_ops)
    fig = Figure(figsize=(5.0 * len(cells) + 1.5, 3.8), layout="constrained")
    axes = fig.subplots(1, len(cells), squeeze=False, sharey=True)[0]
    for ax, cell in zip(axes, cells):
        for op in ops[cell]:
            ys = np.array([m.get(cell, {}).get(op, np.nan) for m in means])
            ax.plot(xs, ys, label=op, color=colors[op], marker="o" if len(xs) <= 30 else None,
                    markersize=3)
        ax.set_title(cell)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean softmax(α) over edges")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --- collapse curves ----------------------------------------------------------------------------
def plot_collapse_curves(series: Mapping[str, Sequence[float]], path: str | Path,
                         ylabel: str = "parameter-free ops in derived cell",
                         xlabel: str = "epoch", title: str | None = None, first_epoch: int = 1) -> Path:
    """Several methods (or seeds) on one axis: the collapse curve, one line per label. Value i
    of a series is epoch `first_epoch + i` (1-based, as the search logs count epochs)."""
    return _save(collapse_figure(series, ylabel, xlabel, title, first_epoch), path)


def collapse_figure(series: Mapping[str, Sequence[float]], ylabel: str = "parameter-free ops in derived cell",
                    xlabel: str = "epoch", title: str | None = None, first_epoch: int = 1) -> Figure:
    """The figure `plot_collapse_curves` saves."""
    clean = {str(k): np.asarray(list(v), dtype=float) for k, v in series.items() if len(v)}
    if not clean:
        raise ValueError("plot_collapse_curves: no series with values to plot")
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    colors = _colors(list(clean))
    for label, ys in clean.items():
        ax.plot(first_epoch + np.arange(len(ys)), ys, label=label, color=colors[label], marker="o",
                markersize=3 if len(ys) <= 60 else 0)
    values = np.concatenate(list(clean.values()))
    finite = _finite(values)
    if finite.size and np.all(finite == np.round(finite)):
        from matplotlib.ticker import MaxNLocator
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))    # counts: no 2.5 ops
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


# --- training curves ----------------------------------------------------------------------------
def _kind(key: str) -> str:
    k = key.lower()
    if "loss" in k:
        return "loss"
    if "acc" in k or "top1" in k or "top5" in k:
        return "accuracy"
    return "value"


def plot_training_curves(history: Sequence[Mapping[str, Any]], keys: Sequence[str],
                         path: str | Path, title: str | None = None, x_key: str = "epoch") -> Path:
    """Losses, accuracies (and anything else in `keys`) vs epoch, one panel per kind.

    The x value is the entry's `x_key` ("epoch") when present, else its index; a key missing from
    an entry is a gap in its line.
    """
    if not history:
        raise ValueError("plot_training_curves: the history is empty (no epochs to plot)")
    if not keys:
        raise ValueError("plot_training_curves: no keys to plot")
    xs = np.array([float(h.get(x_key, i)) if isinstance(h.get(x_key, i), (int, float)) else i
                   for i, h in enumerate(history)])
    lines: dict[str, dict[str, np.ndarray]] = {}
    for key in keys:
        ys = np.array([_num(h.get(key)) for h in history])
        if np.isfinite(ys).any():
            lines.setdefault(_kind(key), {})[key] = ys
    if not lines:
        raise ValueError(f"plot_training_curves: none of {list(keys)} has a numeric value in the "
                         f"history; keys present: {sorted({k for h in history for k in h})}")
    order = [k for k in ("loss", "accuracy", "value") if k in lines]
    fig = Figure(figsize=(4.8 * len(order) + 0.5, 3.6), layout="constrained")
    axes = fig.subplots(1, len(order), squeeze=False)[0]
    for ax, kind in zip(axes, order):
        for key, ys in lines[kind].items():
            ax.plot(xs, ys, label=key, marker="o" if len(xs) <= 30 else None, markersize=3)
        ax.set_xlabel(x_key)
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _num(value: Any) -> float:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return float("nan")


# --- a distribution with results marked ---------------------------------------------------------
def plot_distribution_with_points(values: Any, points: Mapping[str, Sequence[float]],
                                  path: str | Path, xlabel: str, title: str | None = None,
                                  bins: int = 60) -> Path:
    """Histogram of `values` (e.g. every NB201 cell's accuracy) with each label's results marked.

    Each label's points are vertical lines; its legend entry gives the mean and the share of the
    distribution that beats it ("top x%"), the number a reader wants from this plot.
    """
    data = np.asarray(values, dtype=float).ravel()
    data = _finite(data)
    if data.size == 0:
        raise ValueError("plot_distribution_with_points: no finite values for the histogram")
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.hist(data, bins=bins, color="0.7", edgecolor="0.55", linewidth=0.4,
            label=f"all ({data.size})")
    colors = _colors(list(points))
    sorted_data = np.sort(data)
    for label, pts in points.items():
        arr = _finite(np.asarray(list(pts), dtype=float))
        if arr.size == 0:
            continue
        mean = float(arr.mean())
        better = 1.0 - np.searchsorted(sorted_data, mean, side="right") / sorted_data.size
        for i, p in enumerate(arr):
            ax.axvline(p, color=colors[label], linewidth=1.6, alpha=0.9,
                       label=f"{label}: mean {mean:.2f}, top {100 * better:.1f}%" if i == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)
