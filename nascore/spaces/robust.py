"""RobustDARTS spaces S1-S4 (methods.md §1.2): the DARTS cell and network with small op sets.

Each is only data: the op list of every edge. S1's lists are per edge and per cell type (⚠ they
came from iteratively pruning the full DARTS space; the lists themselves are the definition).
"""
from __future__ import annotations

from . import SPACES
from .darts import darts_cell_space

S1_NORMAL = [
    ("skip_connect", "dil_conv_3x3"), ("skip_connect", "dil_conv_5x5"),
    ("skip_connect", "dil_conv_5x5"), ("skip_connect", "sep_conv_3x3"),
    ("skip_connect", "dil_conv_3x3"), ("max_pool_3x3", "skip_connect"),
    ("skip_connect", "sep_conv_3x3"), ("skip_connect", "sep_conv_3x3"),
    ("skip_connect", "dil_conv_3x3"), ("skip_connect", "sep_conv_3x3"),
    ("max_pool_3x3", "skip_connect"), ("skip_connect", "dil_conv_3x3"),
    ("dil_conv_3x3", "dil_conv_5x5"), ("dil_conv_3x3", "dil_conv_5x5"),
]
S1_REDUCE = [
    ("max_pool_3x3", "avg_pool_3x3"), ("max_pool_3x3", "dil_conv_3x3"),
    ("max_pool_3x3", "avg_pool_3x3"), ("max_pool_3x3", "avg_pool_3x3"),
    ("skip_connect", "dil_conv_5x5"), ("max_pool_3x3", "avg_pool_3x3"),
    ("max_pool_3x3", "sep_conv_3x3"), ("skip_connect", "dil_conv_3x3"),
    ("skip_connect", "dil_conv_5x5"), ("max_pool_3x3", "avg_pool_3x3"),
    ("max_pool_3x3", "avg_pool_3x3"), ("skip_connect", "dil_conv_5x5"),
    ("skip_connect", "dil_conv_5x5"), ("skip_connect", "dil_conv_5x5"),
]


def _uniform(name: str, description: str, ops: tuple[str, ...]) -> None:
    SPACES.register(name, darts_cell_space(
        name, description, normal=[ops] * 14, reduce=[ops] * 14,
        # progressive search (our generalisation, ⚠): start from the parametric op, skip last
        progressive_start_ops=("sep_conv_3x3",)))


SPACES.register("s1", darts_cell_space(
    "s1", "RobustDARTS S1: two ops per edge, per-edge lists", S1_NORMAL, S1_REDUCE,
    progressive_start_ops=()))   # per-edge op sets: no common op to add stage by stage
_uniform("s2", "RobustDARTS S2: {skip_connect, sep_conv_3x3} on every edge",
         ("skip_connect", "sep_conv_3x3"))
_uniform("s3", "RobustDARTS S3: {none, skip_connect, sep_conv_3x3} on every edge",
         ("none", "skip_connect", "sep_conv_3x3"))
_uniform("s4", "RobustDARTS S4: {noise, sep_conv_3x3} on every edge",
         ("noise", "sep_conv_3x3"))
