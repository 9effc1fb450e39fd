"""Cell drawings: the derived cells as Graphviz graphs (.dot always; .svg/.png when `dot` exists).

A DARTS-family cell (`Genotype`, cell types "normal" and "reduce") is drawn as in the DARTS paper:
inputs c_{k-2} and c_{k-1}, intermediate nodes 0..3, each fed by two edges labelled with their op,
and the output c_{k} that concatenates the nodes of `*_concat`. An NB201 cell (`NB201Genotype`,
cell type "cell") is nodes 0 (input) to 3 (output) with one labelled edge per op; `none` edges are
omitted (they carry nothing).

The .dot source is built with the `graphviz` Python package and always written, so a machine
without the Graphviz binaries still keeps a drawing that `dot -Tsvg cell.dot -o cell.svg` renders
later; rendering runs only when the `dot` executable is on PATH. Every file is written atomically.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .genotype import NB201_EDGES, NB201_NODES, AnyGenotype, Genotype, NB201Genotype
from .io import write_bytes, write_text

INSTALL_HINT = "apt-get install graphviz / brew install graphviz"
DARTS_CELL_TYPES = ("normal", "reduce")
NB201_CELL_TYPE = "cell"

# Colours of the DARTS paper's figures: inputs blue, intermediate nodes grey-blue, output green.
_INPUT = {"style": "filled", "fillcolor": "darkseagreen2", "shape": "box"}
_NODE = {"style": "filled", "fillcolor": "lightblue", "shape": "box"}
_OUTPUT = {"style": "filled", "fillcolor": "palegoldenrod", "shape": "box"}


@dataclass(frozen=True)
class DrawingResult:
    """What `draw_cell` wrote: the .dot source, the rendered files, and a one-line note or None.

    The note is the same for every cell of a run (e.g. `dot` missing): print it once.
    """

    dot_path: Path
    rendered: list[Path] = field(default_factory=list)
    note: str | None = None


@dataclass
class _CellGraph:
    """A cell as plain data, so that building it does not depend on the graphviz package."""

    name: str
    nodes: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    edges: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    graph_attr: dict[str, str] = field(default_factory=lambda: {
        "rankdir": "LR", "fontname": "helvetica", "fontsize": "14"})
    node_attr: dict[str, str] = field(default_factory=lambda: {
        "fontname": "times", "fontsize": "18", "height": "0.5", "width": "0.5", "penwidth": "2",
        "align": "center"})
    edge_attr: dict[str, str] = field(default_factory=lambda: {"fontname": "times", "fontsize": "16"})

    def source(self) -> str:
        try:
            import graphviz
        except ImportError:    # the package is in requirements; without it the .dot still comes out
            return self._plain_source()
        g = graphviz.Digraph(self.name, format="svg", graph_attr=self.graph_attr,
                             node_attr=self.node_attr, edge_attr=self.edge_attr)
        for node, attrs in self.nodes:
            g.node(node, **attrs)
        for a, b, attrs in self.edges:
            g.edge(a, b, **attrs)
        return g.source

    def _plain_source(self) -> str:
        def q(text: str) -> str:
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

        def attrs(d: dict[str, str]) -> str:
            return " [" + " ".join(f"{k}={q(v)}" for k, v in d.items()) + "]" if d else ""

        lines = [f"digraph {q(self.name)} {{",
                 f"\tgraph{attrs(self.graph_attr)}", f"\tnode{attrs(self.node_attr)}",
                 f"\tedge{attrs(self.edge_attr)}"]
        lines += [f"\t{q(n)}{attrs(a)}" for n, a in self.nodes]
        lines += [f"\t{q(a)} -> {q(b)}{attrs(d)}" for a, b, d in self.edges]
        return "\n".join(lines) + "\n}\n"


def _darts_graph(genotype: Genotype, cell_type: str) -> _CellGraph:
    pairs = getattr(genotype, cell_type)
    concat = getattr(genotype, f"{cell_type}_concat")
    steps = len(pairs) // 2
    names = ["c_{k-2}", "c_{k-1}"] + [str(i) for i in range(steps)]
    g = _CellGraph(f"{cell_type}_cell")
    g.nodes += [(names[0], dict(_INPUT)), (names[1], dict(_INPUT))]
    g.nodes += [(names[2 + i], dict(_NODE)) for i in range(steps)]
    g.nodes.append(("c_{k}", dict(_OUTPUT)))
    for k, (op, j) in enumerate(pairs):
        g.edges.append((names[j], names[2 + k // 2], {"label": op}))
    for c in concat:
        g.edges.append((names[c], "c_{k}", {"color": "gray40"}))
    return g


def _nb201_graph(genotype: NB201Genotype) -> _CellGraph:
    g = _CellGraph("nb201_cell")
    for i in range(NB201_NODES):
        style = _INPUT if i == 0 else _OUTPUT if i == NB201_NODES - 1 else _NODE
        g.nodes.append((str(i), dict(style)))
    for op, (to, frm) in zip(genotype.ops, NB201_EDGES):
        if op != "none":
            g.edges.append((str(frm), str(to), {"label": op}))
    return g


def cell_types(genotype: AnyGenotype) -> tuple[str, ...]:
    """The cell types `draw_cell` accepts for this genotype."""
    return DARTS_CELL_TYPES if isinstance(genotype, Genotype) else (NB201_CELL_TYPE,)


def cell_graph_source(genotype: AnyGenotype, cell_type: str) -> str:
    """The DOT source of one cell."""
    if cell_type not in cell_types(genotype):
        raise ValueError(f"cell type {cell_type!r} is not in a {type(genotype).__name__}; "
                         f"allowed: {', '.join(cell_types(genotype))}")
    if isinstance(genotype, Genotype):
        return _darts_graph(genotype, cell_type).source()
    if isinstance(genotype, NB201Genotype):
        return _nb201_graph(genotype).source()
    raise TypeError(f"cannot draw a {type(genotype).__name__}; expected Genotype or NB201Genotype")


def draw_cell(genotype: AnyGenotype, cell_type: str, out_stem: str | Path,
              formats: Sequence[str] = ("svg", "png")) -> DrawingResult:
    """Write `<out_stem>.dot` and, when Graphviz's `dot` is installed, `<out_stem>.<fmt>`."""
    out_stem = Path(out_stem)
    source = cell_graph_source(genotype, cell_type)
    dot_path = out_stem.with_name(out_stem.name + ".dot")
    write_text(dot_path, source)
    if not formats:
        return DrawingResult(dot_path)
    exe = shutil.which("dot")
    if exe is None:
        return DrawingResult(dot_path, [], f"Graphviz `dot` not found: wrote {dot_path.name} only "
                                           f"({INSTALL_HINT} to also get {'/'.join(formats)})")
    rendered: list[Path] = []
    for fmt in formats:
        target = out_stem.with_name(f"{out_stem.name}.{fmt}")
        try:
            # `dot` straight from the source: no dependence on the graphviz package's own
            # executable lookup, and the bytes go through an atomic write.
            proc = subprocess.run([exe, f"-T{fmt}"], input=source.encode("utf-8"),
                                  capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            return DrawingResult(dot_path, rendered, f"rendering {target.name} failed ({e}); "
                                                     f"wrote {dot_path.name}")
        if proc.returncode != 0 or not proc.stdout:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            return DrawingResult(dot_path, rendered,
                                 f"`dot -T{fmt}` failed ({err[0] if err else f'exit {proc.returncode}'}); "
                                 f"wrote {dot_path.name}")
        write_bytes(target, proc.stdout)
        rendered.append(target)
    return DrawingResult(dot_path, rendered)


def draw_genotype(genotype: AnyGenotype, out_dir: str | Path,
                  formats: Sequence[str] = ("svg", "png")) -> list[DrawingResult]:
    """Draw every cell of `genotype` into `out_dir` (normal.*, reduce.* or cell.*)."""
    out_dir = Path(out_dir)
    return [draw_cell(genotype, ct, out_dir / ct, formats) for ct in cell_types(genotype)]
