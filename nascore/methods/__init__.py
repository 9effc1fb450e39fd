"""Search methods: named points in the grid of independent parts (methods.md §2).

A method is a small preset over ONE shared search loop (`nascore.search`): the switches it sets
(`optimisation`, `partial_channels`, `edge_normalization`, `features`, `op_schedule`, ...) and the
hyper-parameters where its paper differs from DARTS. Every switch is also a plain search param, so
combinations no paper tried (random features + single level, say) need no code: pick a base
method and override the switch in params.yaml. Adding a method is one file in this package with
one `METHODS.register(...)` call; modules are discovered automatically.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..registry import Registry, import_submodules


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)   # search params this method sets
    based_on: str | None = None       # inherit another method's settings, then apply ours
    reference: str = ""               # where the settings come from
    transfer_recipe: str | None = None   # ImageNet training recipe of its paper (None: inherited, else darts)

    def resolved_settings(self) -> dict[str, Any]:
        base = METHODS.get(self.based_on).resolved_settings() if self.based_on else {}
        return {**base, **self.settings}

    def resolved_transfer_recipe(self) -> str:
        if self.transfer_recipe is not None:
            return self.transfer_recipe
        return METHODS.get(self.based_on).resolved_transfer_recipe() if self.based_on else "darts"


METHODS: Registry[Method] = Registry("method")


def get_method(name: str) -> Method:
    return METHODS.get(name)


import_submodules(__name__, __path__)
