"""PC-DARTS (Xu et al., 2020): partial channels + edge normalisation (§2.2)."""
from . import METHODS, Method

METHODS.register("pc_darts", Method(
    "pc_darts", "PC-DARTS: 1/K of the channels through the ops (K=4), channel shuffle, edge "
    "normalisation β, 15 weight-only warm-up epochs",
    settings={
        "optimisation": "first_order",
        "partial_channels": 4,          # K = 4 on CIFAR (2 on ImageNet)
        "channel_shuffle": True,
        "edge_normalization": True,
        "arch_warmup_epochs": 15,       # only w is updated for the first 15 epochs
        "batch_size": 256,              # PC-DARTS' memory saving spent on a 4x batch
        "lr": 0.1,
        "lr_min": 0.0,                  # cosine to 0 (a later release of the ref. impl. uses 1e-3)
        "arch_lr": 6e-4,
    },
    transfer_recipe="pc_darts",         # its ImageNet recipe: lr 0.5, warm-up, linear decay
    reference="methods.md §2.2"))
