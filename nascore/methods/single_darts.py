"""Single-DARTS: weights and α updated from the same training batch (§2.4)."""
from . import METHODS, Method

METHODS.register("single_darts", Method(
    "single_darts", "Single-DARTS: single-level optimisation, one batch feeds both updates",
    settings={"optimisation": "single_level"},
    reference="methods.md §2.4 (⚠ optimisers and data split unconfirmed: DARTS defaults)"))
