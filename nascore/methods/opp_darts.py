"""OPP-DARTS: operation-level progressive search, skip_connect enters last (§2.5)."""
from . import METHODS, Method

METHODS.register("opp_darts", Method(
    "opp_darts", "OPP-DARTS: ops enter stage by stage (max-loss first), skip_connect last; "
    "DARTS first order otherwise",
    settings={"optimisation": "first_order", "op_schedule": "progressive"},
    reference="methods.md §2.5"))
