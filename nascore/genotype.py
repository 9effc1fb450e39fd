"""Genotypes: the discrete cells a search derives, as data (methods.md §1.1, §1.3).

Two shapes of cell exist:
- `Genotype`: a DARTS-family cell (spaces darts, s1-s4): per cell type 8 `(op, input)` pairs, two
  per intermediate node; input 0 = c_{k-2}, 1 = c_{k-1}, 2..5 = nodes 0..3.
- `NB201Genotype`: a NAS-Bench-201 cell: one op on each of its 6 edges, with the benchmark's
  architecture string `|op~0|+|op~0|op~1|+|op~0|op~1|op~2|` as its canonical text form.

Both round-trip through JSON. Text is parsed as data, never evaluated; anything malformed, with an
unknown op or the wrong number of edges, raises `GenotypeError` saying what is wrong.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

from .ops import OPS, PARAMETER_FREE_OPS

DARTS_STEPS = 4                      # intermediate nodes of a DARTS cell
DARTS_NUM_EDGES = 14                 # 2 + 3 + 4 + 5 incoming edges
DARTS_CONCAT = (2, 3, 4, 5)
NB201_NODES = 4                      # node 0 = input, node 3 = output
NB201_EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))   # (to, from), alpha row order
NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")


class GenotypeError(ValueError):
    """A genotype that is malformed, names an unknown op, or has the wrong shape."""


def darts_edge_index(node: int, input_index: int) -> int:
    """Row of alpha for the edge into intermediate node `node` (0..3) from `input_index`."""
    return node * (node + 3) // 2 + input_index


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Genotype:
    """A DARTS-family cell pair. `normal`/`reduce`: 8 (op, input) pairs, two per node in order."""

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...] = DARTS_CONCAT
    reduce: tuple[tuple[str, int], ...] = ()
    reduce_concat: tuple[int, ...] = DARTS_CONCAT

    def __post_init__(self) -> None:
        for cell in ("normal", "reduce"):
            pairs = getattr(self, cell)
            object.__setattr__(self, cell, tuple((str(op), int(j)) for op, j in pairs))
            object.__setattr__(self, f"{cell}_concat", tuple(int(c) for c in getattr(self, f"{cell}_concat")))
        self.validate()

    def validate(self) -> None:
        for cell in ("normal", "reduce"):
            pairs = getattr(self, cell)
            if len(pairs) != 2 * DARTS_STEPS:
                raise GenotypeError(
                    f"{cell} cell has {len(pairs)} (op, input) pairs; a DARTS cell needs "
                    f"{2 * DARTS_STEPS} (two per intermediate node)")
            for k, (op, j) in enumerate(pairs):
                node = k // 2
                if op not in OPS:
                    raise GenotypeError(f"{cell} cell, node {node}: unknown op {op!r}; "
                                        f"allowed: {', '.join(OPS.names())}")
                if not 0 <= j < node + 2:
                    raise GenotypeError(f"{cell} cell, node {node}: input {j} out of range; "
                                        f"node {node} may read inputs 0..{node + 1}")
            concat = getattr(self, f"{cell}_concat")
            if not concat or len(set(concat)) != len(concat) or not all(
                    0 <= c < DARTS_STEPS + 2 for c in concat):
                raise GenotypeError(f"{cell}_concat {list(concat)} must be distinct indices in "
                                    f"0..{DARTS_STEPS + 1}")
            if cell == "reduce" and any(c < 2 for c in concat):
                # a reduction cell's inputs are at twice its nodes' resolution: no concat possible
                raise GenotypeError(f"reduce_concat {list(concat)} contains a cell input (0 or 1); a "
                                    f"reduction cell can only concatenate its nodes 2..{DARTS_STEPS + 1}")

    @property
    def cells(self) -> dict[str, tuple[tuple[str, int], ...]]:
        return {"normal": self.normal, "reduce": self.reduce}

    def ops(self) -> list[str]:
        return [op for op, _ in self.normal + self.reduce]

    def num_parameter_free(self, cell: str | None = None) -> int:
        """Number of parameter-free ops (collapse indicator), in one cell type or in both."""
        pairs = self.cells[cell] if cell else self.normal + self.reduce
        return sum(op in PARAMETER_FREE_OPS for op, _ in pairs)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "darts_cell",
            "normal": [[op, j] for op, j in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, j] for op, j in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def __str__(self) -> str:
        def fmt(pairs: Sequence[tuple[str, int]]) -> str:
            return " ".join(f"({op},{j})" for op, j in pairs)
        return f"normal: {fmt(self.normal)} | reduce: {fmt(self.reduce)}"


@dataclass(frozen=True)
class NB201Genotype:
    """A NAS-Bench-201 cell: one op per edge, edges in `NB201_EDGES` order."""

    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(str(o) for o in self.ops))
        if len(self.ops) != len(NB201_EDGES):
            raise GenotypeError(f"an NB201 cell has {len(NB201_EDGES)} edges, got {len(self.ops)} ops")
        for op, (i, j) in zip(self.ops, NB201_EDGES):
            if op not in NB201_OPS:
                raise GenotypeError(f"NB201 edge {i}<-{j}: unknown op {op!r}; "
                                    f"allowed: {', '.join(NB201_OPS)}")

    def to_arch_string(self) -> str:
        nodes, k = [], 0
        for i in range(1, NB201_NODES):
            nodes.append("|" + "|".join(f"{self.ops[k + j]}~{j}" for j in range(i)) + "|")
            k += i
        return "+".join(nodes)

    @classmethod
    def from_arch_string(cls, text: str) -> "NB201Genotype":
        if not isinstance(text, str):
            raise GenotypeError(f"an NB201 architecture string must be text, got {type(text).__name__}")
        nodes = text.strip().split("+")
        if len(nodes) != NB201_NODES - 1:
            raise GenotypeError(f"NB201 string {text!r}: expected {NB201_NODES - 1} nodes separated "
                                f"by '+', e.g. '|nor_conv_3x3~0|+|skip_connect~0|none~1|+|...|'")
        ops: list[str] = []
        for i, node in enumerate(nodes, start=1):
            if not (node.startswith("|") and node.endswith("|")):
                raise GenotypeError(f"NB201 string {text!r}: node {i} {node!r} must be '|op~j|...|'")
            items = node[1:-1].split("|")
            if len(items) != i:
                raise GenotypeError(f"NB201 string {text!r}: node {i} needs {i} edges, got {len(items)}")
            for j, item in enumerate(items):
                m = re.fullmatch(r"([a-z0-9_]+)~(\d+)", item)
                if not m or int(m.group(2)) != j:
                    raise GenotypeError(f"NB201 string {text!r}: node {i} item {item!r} must be "
                                        f"'op~{j}'")
                ops.append(m.group(1))
        return cls(tuple(ops))

    def num_parameter_free(self, cell: str | None = None) -> int:
        return sum(op in PARAMETER_FREE_OPS for op in self.ops)

    def input_reaches_output(self) -> bool:
        """Whether some path from the input node to the output avoids `none`. If not, the cell's
        output is the same for every image: a network of such cells ignores its input (NB201
        scores it at chance, 10% on CIFAR-10). Collapse towards `none` can derive one."""
        reached = {0}
        for op, (to, src) in zip(self.ops, NB201_EDGES):      # edges come in order of their target
            if op != "none" and src in reached:
                reached.add(to)
        return NB201_NODES - 1 in reached

    def to_json(self) -> dict[str, Any]:
        return {"type": "nb201_cell", "arch": self.to_arch_string()}

    def __str__(self) -> str:
        return self.to_arch_string()


AnyGenotype = Union[Genotype, NB201Genotype]


# --- JSON ---------------------------------------------------------------------------------------
def _pairs(value: Any, where: str) -> list[tuple[str, int]]:
    if not isinstance(value, list):
        raise GenotypeError(f"{where} must be a list of [op, input] pairs, got {type(value).__name__}")
    out = []
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                or isinstance(item[1], bool) or not isinstance(item[1], int)):
            raise GenotypeError(f"{where}: {item!r} is not an [op_name, input_index] pair")
        out.append((item[0], item[1]))
    return out


def _ints(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in value):
        raise GenotypeError(f"{where} must be a list of integers, got {value!r}")
    return value


def genotype_from_json(data: Any) -> AnyGenotype:
    """Build a genotype from parsed JSON (a dict with "type": "darts_cell" or "nb201_cell")."""
    if not isinstance(data, dict):
        raise GenotypeError(f"a genotype must be a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    if kind == "darts_cell":
        unknown = set(data) - {"type", "normal", "normal_concat", "reduce", "reduce_concat"}
        if unknown:
            raise GenotypeError(f"unknown genotype keys {sorted(unknown)}")
        return Genotype(
            normal=tuple(_pairs(data.get("normal"), "normal")),
            normal_concat=tuple(_ints(data.get("normal_concat", list(DARTS_CONCAT)), "normal_concat")),
            reduce=tuple(_pairs(data.get("reduce"), "reduce")),
            reduce_concat=tuple(_ints(data.get("reduce_concat", list(DARTS_CONCAT)), "reduce_concat")),
        )
    if kind == "nb201_cell":
        return NB201Genotype.from_arch_string(data.get("arch"))
    raise GenotypeError(f"genotype 'type' must be 'darts_cell' or 'nb201_cell', got {kind!r}")


def genotype_from_text(text: str) -> AnyGenotype:
    """Parse a genotype from JSON text or an NB201 architecture string. Never evaluates code."""
    stripped = text.strip()
    if stripped.startswith("|"):
        return NB201Genotype.from_arch_string(stripped)
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as e:
        raise GenotypeError(
            f"a genotype must be JSON (e.g. {{\"type\": \"darts_cell\", \"normal\": [[\"sep_conv_3x3\", 0], ...]}}) "
            f"or an NB201 string; could not parse it as JSON: {e.msg} at line {e.lineno}") from None
    return genotype_from_json(data)


def load_genotype(path: str | Path) -> AnyGenotype:
    path = Path(path)
    if not path.is_file():
        raise GenotypeError(f"genotype file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GenotypeError(f"genotype file {path} is not UTF-8 text") from None
    try:
        return genotype_from_text(text)
    except GenotypeError as e:
        raise GenotypeError(f"{path}: {e}") from None


def resolve_genotype(ref: str) -> AnyGenotype:
    """A published genotype by name (`DARTS_V2`), an NB201 string, or a path to a JSON file."""
    if ref in PUBLISHED_GENOTYPES:
        return PUBLISHED_GENOTYPES[ref]
    if ref.strip().startswith("|"):
        return NB201Genotype.from_arch_string(ref)
    if Path(ref).is_file():
        return load_genotype(ref)
    raise GenotypeError(f"genotype {ref!r} is neither a published name ({', '.join(PUBLISHED_GENOTYPES)}), "
                        f"an NB201 string, nor an existing JSON file")


# --- derivation rules ---------------------------------------------------------------------------
def derive_darts_cell(weights: Sequence[Sequence[float]], edge_ops: Sequence[Sequence[str]]
                      ) -> tuple[tuple[str, int], ...]:
    """DARTS rule for one cell type: per node keep the 2 edges with the strongest non-`none` op.

    `weights[e][o]` is the (softmaxed, possibly edge-normalised) weight of op `edge_ops[e][o]` on
    edge e. Edges are ranked by their best non-`none` weight with a stable sort (ties -> lower
    input index); on a kept edge the argmax non-`none` op wins (ties -> earlier column).
    """
    if len(weights) != DARTS_NUM_EDGES or len(edge_ops) != DARTS_NUM_EDGES:
        raise GenotypeError(f"DARTS derivation needs {DARTS_NUM_EDGES} edges, got {len(weights)}")
    pairs: list[tuple[str, int]] = []
    for node in range(DARTS_STEPS):
        best: list[tuple[float, str]] = []
        for j in range(node + 2):
            e = darts_edge_index(node, j)
            candidates = [(float(w), op) for w, op in zip(weights[e], edge_ops[e]) if op != "none"]
            if not candidates:
                raise GenotypeError(f"edge {e} has no op other than 'none' to derive")
            top_w, top_op = candidates[0]
            for w, op in candidates[1:]:
                if w > top_w:
                    top_w, top_op = w, op
            best.append((top_w, top_op))
        order = sorted(range(node + 2), key=lambda j: -best[j][0])[:2]   # stable: ties -> lower j
        pairs.extend((best[j][1], j) for j in order)
    return tuple(pairs)


def derive_nb201_cell(weights: Sequence[Sequence[float]], edge_ops: Sequence[Sequence[str]]
                      ) -> NB201Genotype:
    """NB201 rule: on every edge the argmax op over all candidates, `none` included."""
    if len(weights) != len(NB201_EDGES):
        raise GenotypeError(f"NB201 derivation needs {len(NB201_EDGES)} edges, got {len(weights)}")
    ops = []
    for w, names in zip(weights, edge_ops):
        k = max(range(len(names)), key=lambda o: (float(w[o]), -o))   # ties -> earlier column
        ops.append(names[k])
    return NB201Genotype(tuple(ops))


def alpha_entropy(probs: Sequence[Sequence[float]]) -> float:
    """Mean Shannon entropy (nats) of the per-edge op distributions."""
    total = 0.0
    for row in probs:
        total -= sum(p * math.log(p) for p in row if p > 0)
    return total / max(len(probs), 1)


# --- published genotypes (methods.md §1.1) -------------------------------------------------------
def _g(normal: str, reduce: str) -> Genotype:
    def parse(s: str) -> tuple[tuple[str, int], ...]:
        return tuple((op, int(j)) for op, j in re.findall(r"\((\w+),(\d)\)", s))
    return Genotype(normal=parse(normal), reduce=parse(reduce))


PUBLISHED_GENOTYPES: dict[str, Genotype] = {
    "DARTS_V1": _g(
        "(sep_conv_3x3,1) (sep_conv_3x3,0) (skip_connect,0) (sep_conv_3x3,1) "
        "(skip_connect,0) (sep_conv_3x3,1) (sep_conv_3x3,0) (skip_connect,2)",
        "(max_pool_3x3,0) (max_pool_3x3,1) (skip_connect,2) (max_pool_3x3,0) "
        "(max_pool_3x3,0) (skip_connect,2) (skip_connect,2) (avg_pool_3x3,0)"),
    "DARTS_V2": _g(
        "(sep_conv_3x3,0) (sep_conv_3x3,1) (sep_conv_3x3,0) (sep_conv_3x3,1) "
        "(sep_conv_3x3,1) (skip_connect,0) (skip_connect,0) (dil_conv_3x3,2)",
        "(max_pool_3x3,0) (max_pool_3x3,1) (skip_connect,2) (max_pool_3x3,1) "
        "(max_pool_3x3,0) (skip_connect,2) (skip_connect,2) (max_pool_3x3,1)"),
    "PC_DARTS_cifar": _g(
        "(sep_conv_3x3,1) (skip_connect,0) (sep_conv_3x3,0) (dil_conv_3x3,1) "
        "(sep_conv_5x5,0) (sep_conv_3x3,1) (avg_pool_3x3,0) (dil_conv_3x3,1)",
        "(sep_conv_5x5,1) (max_pool_3x3,0) (sep_conv_5x5,1) (sep_conv_5x5,2) "
        "(sep_conv_3x3,0) (sep_conv_3x3,3) (sep_conv_3x3,1) (sep_conv_3x3,2)"),
    "PC_DARTS_image": _g(
        "(skip_connect,1) (sep_conv_3x3,0) (sep_conv_3x3,0) (skip_connect,1) "
        "(sep_conv_3x3,1) (sep_conv_3x3,3) (sep_conv_3x3,1) (dil_conv_5x5,4)",
        "(sep_conv_3x3,0) (skip_connect,1) (dil_conv_5x5,2) (max_pool_3x3,1) "
        "(sep_conv_3x3,2) (sep_conv_3x3,1) (sep_conv_5x5,0) (sep_conv_3x3,3)"),
    # The cell shipped as the OPP-DARTS reference implementation's default architecture;
    # unconfirmed that it is the paper's reported cell (methods.md §1.1).
    "OPP_DARTS": _g(
        "(sep_conv_3x3,0) (skip_connect,1) (skip_connect,2) (sep_conv_3x3,0) "
        "(dil_conv_5x5,1) (dil_conv_5x5,2) (dil_conv_5x5,2) (dil_conv_5x5,1)",
        "(sep_conv_3x3,0) (sep_conv_3x3,1) (sep_conv_3x3,0) (sep_conv_3x3,2) "
        "(sep_conv_3x3,0) (sep_conv_3x3,2) (sep_conv_3x3,0) (sep_conv_3x3,1)"),
}
DARTS_V2 = PUBLISHED_GENOTYPES["DARTS_V2"]
