"""DARTS (Liu et al., 2019): the baseline every other method changes one part of (§2.1)."""
from . import METHODS, Method

METHODS.register("darts", Method(
    "darts", "DARTS, first order (DARTS-V1): bi-level, α step on a validation batch, then w step",
    settings={"optimisation": "first_order"},
    reference="methods.md §2.1"))

METHODS.register("darts_v2", Method(
    "darts_v2", "DARTS, second order (DARTS-V2): unrolled α gradient with finite-difference HVP",
    settings={"optimisation": "second_order"},
    reference="methods.md §2.1"))
