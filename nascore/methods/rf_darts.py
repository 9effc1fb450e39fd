"""RF-DARTS / RF-PCDARTS: random features, only BatchNorm (and α) trained (§2.3)."""
from . import METHODS, Method

METHODS.register("rf_darts", Method(
    "rf_darts", "RF-DARTS: DARTS with convolutions frozen at their random init, affine BN trained",
    based_on="darts", settings={"features": "random"},
    reference="methods.md §2.3 (⚠ optimiser of the BN parameters and first vs second order unconfirmed)"))

METHODS.register("rf_pcdarts", Method(
    "rf_pcdarts", "RF-PCDARTS: PC-DARTS with random features",
    based_on="pc_darts", settings={"features": "random"},
    reference="methods.md §2.3"))
