"""Search spaces, looked up by name (methods.md §1).

A space is data plus a macro network: the op list of every edge per cell type, which derivation
rule applies, which ops count as parametric starters for a progressive search, the hyper-parameters
where its reference protocol differs from DARTS's, and a `build_supernet(cfg)` that assembles the
search network from the generic parts in `nascore.supernet`. Adding a space is one file here with
one `SPACES.register(...)` call; modules are discovered automatically.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..genotype import AnyGenotype, derive_darts_cell, derive_nb201_cell, Genotype
from ..registry import Registry, import_submodules
from ..supernet import Supernet, SupernetConfig

DerivationInput = Mapping[str, tuple[list[list[float]], list[list[str]]]]


def derive_with_darts_rule(w: DerivationInput) -> AnyGenotype:
    return Genotype(normal=derive_darts_cell(*w["normal"]), reduce=derive_darts_cell(*w["reduce"]))


def derive_with_nb201_rule(w: DerivationInput) -> AnyGenotype:
    return derive_nb201_cell(*w["cell"])


# derivation rule name -> (genotype kind it needs, function)
DERIVATION_RULES: dict[str, tuple[str, Callable[[DerivationInput], AnyGenotype]]] = {
    "darts": ("darts_cell", derive_with_darts_rule),
    "nb201": ("nb201_cell", derive_with_nb201_rule),
}


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    edge_ops: Mapping[str, tuple[tuple[str, ...], ...]]     # cell type -> per-edge op lists
    genotype_kind: str                                       # "darts_cell" | "nb201_cell"
    derivation_rule: str                                     # default rule, a DERIVATION_RULES key
    build_network: Callable[["SearchSpace", SupernetConfig], Supernet]
    # OPP-DARTS: the parametric ops one of which starts the search; skip_connect enters last.
    progressive_start_ops: tuple[str, ...] = ()
    # search hyper-parameters where this space's reference protocol differs from DARTS (§1.3)
    search_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cell_types(self) -> tuple[str, ...]:
        return tuple(self.edge_ops)

    @property
    def uniform_ops(self) -> tuple[str, ...] | None:
        """The op list if every edge of every cell type has the same one, else None (S1)."""
        lists = {ops for ct in self.edge_ops for ops in self.edge_ops[ct]}
        return lists.pop() if len(lists) == 1 else None

    def op_names(self) -> list[str]:
        return sorted({op for ct in self.edge_ops for ops in self.edge_ops[ct] for op in ops})

    def build_supernet(self, cfg: SupernetConfig) -> Supernet:
        net = self.build_network(self, cfg)
        if cfg.random_features:
            net.apply_random_features()
        return net

    def derive(self, weights: DerivationInput, rule: str | None = None) -> AnyGenotype:
        kind, fn = DERIVATION_RULES[rule or self.derivation_rule]
        if kind != self.genotype_kind:
            raise ValueError(f"derivation rule {rule!r} derives {kind} genotypes; space {self.name!r} "
                             f"has {self.genotype_kind} cells (use rule {self.derivation_rule!r})")
        return fn(weights)

    def allowed_rules(self) -> list[str]:
        return [r for r, (kind, _) in DERIVATION_RULES.items() if kind == self.genotype_kind]


SPACES: Registry[SearchSpace] = Registry("search space")


def get_space(name: str) -> SearchSpace:
    return SPACES.get(name)


import_submodules(__name__, __path__)
