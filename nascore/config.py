"""params.yaml: typed sections, `auto` values, validation, profiles (style: nanoGPT's configurator).

Every section is a frozen dataclass whose defaults are the spec's (methods.md). A value written
`auto` in params.yaml is resolved, lowest priority first, from:

    dataclass default (DARTS on CIFAR-10) < space < dataset < method < profile < explicit value

so `dvc exp run -S method=pc_darts` picks up PC-DARTS' batch 256 and lr 0.1 while an explicit
`-S search.lr=0.05` still wins. Unknown keys, wrong types, out-of-range values and combinations
that make no sense stop the run before any work, with a message naming what is allowed.

Each stage resolves only the sections it declares to DVC in dvc.yaml (`resolve_stage`), and a
test checks that every key a stage reads is declared: a param a stage reads but does not declare
would make `dvc exp run -S` silently do nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .data import DATASETS, SPLIT_RULES, split_rule
from .genotype import GenotypeError, NB201Genotype, resolve_genotype
from .methods import METHODS, get_method
from .op_schedules import OP_SCHEDULES
from .optimisation import UPDATE_RULES
from .search import SearchConfig, speed_option_problems
from .spaces import DERIVATION_RULES, SPACES, get_space
from .train import PRESETS as TRAIN_PRESETS, TrainConfig

AUTO = "auto"
PROFILES = ("full", "smoke")


class ConfigError(ValueError):
    """params.yaml is wrong; the message says where and what is allowed."""


# --- sections ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticConfig:
    """The seeded, class-dependent synthetic dataset (smoke runs, tests)."""

    num_train: int = 2048
    num_test: int = 512
    image_size: int = 32


@dataclass(frozen=True)
class DataConfig:
    root: str = AUTO             # dataset folder / ImageFolder tree / archive; auto: see data_root()
    download: bool = True        # torchvision download when root holds nothing (needs internet)
    split: str = AUTO            # first_half | random | test_half; auto: as methods.md says per space
    split_fraction: float = 0.5  # share of the training set for w; the rest drives α (DARTS 50/50)
    split_seed: int = 0          # the split is fixed across run seeds, so seeds compare like for like
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class DeriveConfig:
    rule: str = AUTO             # darts | nb201; auto: the space's own rule


@dataclass(frozen=True)
class NetworkTrainConfig:
    """A retraining run: which cell, which network, which data handling, which recipe."""

    genotype: str = "derived"    # derived | a published name (DARTS_V2, ...) | NB201 string | JSON path
    batch_size: int = 96
    init_channels: int = 36
    layers: int = 20
    auxiliary: bool = True
    cutout: int = 16             # side of the cutout hole; 0 = off
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class TransferConfig(NetworkTrainConfig):
    data: str = "none"           # none (stage skipped) | synthetic | path to an ImageFolder tree
    recipe: str = AUTO           # darts | pc_darts (TRANSFER_RECIPES); auto: the method's paper's
    image_size: int = 224
    num_classes: int = 1000      # used with synthetic data; a folder's classes win otherwise
    workers: int = 8


@dataclass(frozen=True)
class EvaluateConfig:
    nb201_table: str = AUTO      # CSV in the format of ../shared/data/nb201-accuracy.csv; none = off


@dataclass(frozen=True)
class RunConfig:
    """The resolved parameters of a pipeline run (the stages each use their own part)."""

    method: str = "darts"
    space: str = "darts"
    dataset: str = "cifar10"
    seed: int = 2                # DARTS' reference seed
    profile: str = "full"
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    retrain: NetworkTrainConfig = field(default_factory=NetworkTrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# The params each stage reads (and so must declare in dvc.yaml). Top-level keys are bare names.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("dataset", "profile", "data", "space"),      # space: data.split auto
    "search": ("method", "space", "dataset", "seed", "profile", "data", "search"),
    "derive": ("space", "derive"),
    "retrain": ("space", "dataset", "seed", "profile", "data", "retrain"),
    "transfer_imagenet": ("method", "space", "seed", "profile", "transfer"),    # method: transfer.recipe auto
    "evaluate": ("method", "space", "dataset", "seed", "profile", "evaluate"),
}

# --- defaults that depend on the space, the dataset and the profile ------------------------------
# NB201 networks are trained with the benchmark's own protocol (NB201 paper, not methods.md):
# 200 epochs, batch 256, SGD lr 0.1 Nesterov, wd 5e-4, cosine to 0, crop + flip only.
NB201_RETRAIN = {
    "batch_size": 256, "init_channels": 16, "layers": 5, "auxiliary": False, "cutout": 0,
    "train": {"epochs": 200, "lr": 0.1, "nesterov": True, "weight_decay": 5e-4, "drop_path": 0.0,
              "grad_clip": 0.0},
}
# RobustDARTS follow-up convention (⚠ methods.md §1.2): CIFAR-100 and SVHN at 8 cells × 16 ch.
ROBUST_SMALL_EVAL = {"init_channels": 16, "layers": 8}
IMAGENET_TRANSFER = {"batch_size": 128, "init_channels": 48, "layers": 14, "cutout": 0}
# The ImageNet training recipes (methods.md §1.1): transfer.recipe -> train.PRESETS entry. Both
# train 128 images per GPU: DARTS on one GPU; PC-DARTS 1024 on 8 GPUs, which its lr 0.5 is for (the
# transfer stage warns on another global batch). rf_pcdarts inherits PC-DARTS' recipe (⚠ assumed).
TRANSFER_RECIPES = {"darts": "darts_imagenet", "pc_darts": "pc_darts_imagenet"}
PC_DARTS_GLOBAL_BATCH = 1024


def recipe_layer(recipe: str) -> dict[str, Any]:
    """The transfer defaults of `recipe`: the network sizes and the preset's training settings
    (those that differ from TrainConfig's defaults)."""
    preset, default = TRAIN_PRESETS[TRANSFER_RECIPES[recipe]], TrainConfig()
    train = {f.name: getattr(preset, f.name) for f in fields(TrainConfig)
             if getattr(preset, f.name) != getattr(default, f.name)}
    return {**IMAGENET_TRANSFER, "recipe": recipe, "train": train}


def recipe_batch_warning(sec: TransferConfig, world_size: int) -> str | None:
    """Why PC-DARTS' lr may not fit this run: its lr 0.5 is for a global batch of 1024."""
    batch = sec.batch_size * world_size
    if sec.recipe != "pc_darts" or batch == PC_DARTS_GLOBAL_BATCH:
        return None
    return (f"PC-DARTS' ImageNet recipe pairs lr 0.5 with a global batch of {PC_DARTS_GLOBAL_BATCH} "
            f"(8 GPUs x 128); this run's is {batch} ({world_size} x transfer.batch_size={sec.batch_size}), "
            f"with transfer.train.lr={sec.train.lr:g}. Run on 8 GPUs (torchrun), or scale the lr with the "
            f"batch (linear rule: {0.5 * batch / PC_DARTS_GLOBAL_BATCH:g})")

# smoke: the whole pipeline on synthetic data on a laptop CPU in minutes.
SMOKE: dict[str, Any] = {
    "data": {"synthetic": {"num_train": 64, "num_test": 32, "image_size": 16}},
    "search": {"epochs": 2, "batch_size": 16, "init_channels": 4, "layers": 5, "valid_every": 1,
               "arch_warmup_epochs": 1, "opp": {"stage_epochs": 1, "skip_after_epoch": 0}},
    "retrain": {"batch_size": 16, "init_channels": 8, "layers": 5, "auxiliary": False, "cutout": 4,
                "train": {"epochs": 2, "progress": "log"}},
    "transfer": {"data": "synthetic", "batch_size": 8, "init_channels": 8, "layers": 5,
                 "image_size": 64, "num_classes": 5, "auxiliary": False,
                 "train": {"epochs": 1, "warmup_epochs": 0, "progress": "log"}},
}
SMOKE_NB201_LAYERS = {"search": {"layers": 1}, "retrain": {"layers": 1}}


def section_defaults(section: str, run: Mapping[str, Any],
                     user: Mapping[str, Any] | None = None) -> list[Mapping[str, Any]]:
    """The default layers for `section`, lowest priority first, given the top-level choices (and
    the section's own `recipe`, for transfer)."""
    space, dataset, method, profile = (run.get(k) for k in ("space", "dataset", "method", "profile"))
    layers: list[Mapping[str, Any]] = []
    if section == "search":
        sp = get_space(space)
        layers.append({k: v for k, v in sp.search_defaults.items() if k in _field_names(SearchConfig)})
        layers.append(get_method(method).resolved_settings())
    elif section == "retrain":
        if space == "nb201":
            layers.append(NB201_RETRAIN)
        elif space in ("s1", "s2", "s3", "s4") and dataset in ("cifar100", "svhn"):
            layers.append(ROBUST_SMALL_EVAL)
        if space != "nb201" and dataset in DATASETS and not _aux_head_fits(DATASETS.get(dataset).image_size):
            layers.append({"auxiliary": False})     # ImageNet16-120's 16 px: no room for the head
    elif section == "transfer":
        recipe = (user or {}).get("recipe", AUTO)
        if recipe == AUTO:
            recipe = get_method(method).resolved_transfer_recipe()
        if recipe not in TRANSFER_RECIPES:
            raise ConfigError(f"params.yaml: transfer.recipe={recipe!r} is unknown; allowed: auto, "
                              f"{', '.join(TRANSFER_RECIPES)}")
        layers.append(recipe_layer(recipe))
    if profile == "smoke":
        if section in SMOKE:
            layers.append(SMOKE[section])
        if space == "nb201" and section in SMOKE_NB201_LAYERS:
            layers.append(SMOKE_NB201_LAYERS[section])
    if section == "transfer" and space == "nb201":
        layers.append({"data": "none"})      # no ImageNet network exists for NB201 cells
    return layers


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


# --- loading -------------------------------------------------------------------------------------
def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root (where params.yaml is)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)      # a SafeLoader: plain data only
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(data).__name__}")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML keeps the last one
    silently, and `dvc params diff` then disagrees with what the run used)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):
                continue                 # SafeLoader's own message says so below
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


class _Recorder(dict):
    """A params mapping that records which keys were read (for the dvc.yaml declaration test)."""

    def __init__(self, data: Mapping[str, Any], log: set[str], prefix: str = "") -> None:
        super().__init__(data)
        self._log, self._prefix = log, prefix

    def _wrap(self, key: str, value: Any) -> Any:
        self._log.add(self._prefix + key)
        if isinstance(value, dict):
            return _Recorder(value, self._log, f"{self._prefix}{key}.")
        return value

    def __getitem__(self, key: str) -> Any:
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: str, default: Any = None) -> Any:
        return self._wrap(key, super().get(key, default))

    def items(self):   # type: ignore[override]
        return [(k, self._wrap(k, v)) for k, v in super().items()]


def resolve_stage(stage: str, params: Mapping[str, Any]) -> RunConfig:
    """Validate and resolve the sections `stage` reads; the other sections keep their defaults."""
    if stage not in STAGE_PARAMS:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_PARAMS)}")
    return resolve(params, sections=STAGE_PARAMS[stage])


def resolve(params: Mapping[str, Any], sections: tuple[str, ...] | None = None) -> RunConfig:
    """params.yaml content -> RunConfig, for all sections or only `sections`."""
    known = _field_names(RunConfig)
    unknown = set(params) - known
    if unknown:       # str(): YAML makes `1:` an int and `yes:` a bool
        raise ConfigError(f"params.yaml: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"known: {', '.join(sorted(known))}")
    wanted = set(sections) if sections is not None else known
    top: dict[str, Any] = {}
    for key, registry in (("method", METHODS), ("space", SPACES), ("dataset", DATASETS)):
        if key in wanted:
            value = params.get(key, getattr(RunConfig, key))
            if not isinstance(value, str) or value not in registry:
                raise ConfigError(f"params.yaml: {key}={value!r} is unknown; allowed: "
                                  f"{', '.join(registry.names())}")
            top[key] = value
    if "dataset" in wanted and not DATASETS.get(top["dataset"]).in_memory:
        searchable = [n for n in DATASETS.names() if DATASETS.get(n).in_memory]
        raise ConfigError(f"params.yaml: dataset={top['dataset']!r} is not one to search and retrain on; "
                          f"allowed: {', '.join(searchable)}. ImageNet is the transfer stage's: set "
                          f"transfer.data to its ImageFolder tree")
    if "seed" in wanted:
        top["seed"] = _check_value("seed", params.get("seed", RunConfig.seed), int)
        if not 0 <= top["seed"] < 2**63:
            raise ConfigError(f"params.yaml: seed={top['seed']} must be in [0, 2**63)")
    if "profile" in wanted:
        top["profile"] = params.get("profile", "full")
        if top["profile"] not in PROFILES:
            raise ConfigError(f"params.yaml: profile={top['profile']!r} is unknown; allowed: "
                              f"{', '.join(PROFILES)}")
    context = dict(top)     # only what this stage declares: its defaults may depend on nothing else
    resolved: dict[str, Any] = dict(top)
    for name, cls in (("data", DataConfig), ("search", SearchConfig), ("derive", DeriveConfig),
                      ("retrain", NetworkTrainConfig), ("transfer", TransferConfig),
                      ("evaluate", EvaluateConfig)):
        if name not in wanted:
            continue
        user = params.get(name) or {}
        if not isinstance(user, Mapping):
            raise ConfigError(f"params.yaml: {name} must be a mapping of keys, got {user!r}")
        resolved[name] = build_section(cls, name, user, section_defaults(name, context, user))
    for name in ("retrain", "transfer"):
        section = params.get(name) if name in wanted else None
        train = section.get("train") if isinstance(section, Mapping) else None
        if isinstance(train, Mapping) and train.get("seed", AUTO) != AUTO:
            raise ConfigError(f"params.yaml: {name}.train.seed is set by the top-level seed (every stage "
                              f"of a run shares it); remove {name}.train.seed and set seed instead")
    run = RunConfig(**resolved)
    if "seed" in wanted and "retrain" in wanted:
        run = dataclasses.replace(run, retrain=_with_seed(run.retrain, run.seed))
    if "seed" in wanted and "transfer" in wanted:
        run = dataclasses.replace(run, transfer=_with_seed(run.transfer, run.seed))
    if "search" in wanted and "space" in wanted:
        run = dataclasses.replace(run, search=_resolve_step_order(run.search, params, context))
    check_combinations(run, wanted)
    return run


def _with_seed(section: NetworkTrainConfig, seed: int) -> Any:
    return dataclasses.replace(section, train=dataclasses.replace(section.train, seed=seed))


def _resolve_step_order(cfg: SearchConfig, params: Mapping[str, Any], ctx: Mapping[str, Any]) -> SearchConfig:
    """NB201's DARTS-V1 steps weights before α (§1.3); everywhere else α first."""
    user = (params.get("search") or {}).get("step_order", AUTO)
    if user != AUTO:
        return cfg
    space_order = get_space(ctx["space"]).search_defaults.get("first_order_step_order")
    if cfg.optimisation == "first_order" and space_order:
        return dataclasses.replace(cfg, step_order=space_order)
    return dataclasses.replace(cfg, step_order="alpha_first")


def build_section(cls: type, where: str, user: Mapping[str, Any],
                  layers: list[Mapping[str, Any]]) -> Any:
    """Dataclass defaults, then each default layer, then the user's non-`auto` values."""
    names = _field_names(cls)
    unknown = set(user) - names
    if unknown:
        raise ConfigError(f"params.yaml: unknown key(s) {', '.join(f'{where}.{k}' for k in sorted(unknown))}; "
                          f"known in {where}: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        kind = hints[f.name]
        sub_layers = [layer[f.name] for layer in layers if f.name in layer]
        explicit = user.get(f.name, AUTO)
        if is_dataclass(kind):
            if explicit != AUTO and not isinstance(explicit, Mapping):
                raise ConfigError(f"params.yaml: {where}.{f.name} must be a mapping, got {explicit!r}")
            values[f.name] = build_section(kind, f"{where}.{f.name}",
                                           explicit if explicit != AUTO else {}, sub_layers)
            continue
        value = sub_layers[-1] if sub_layers else _default(f)
        if explicit != AUTO:
            value = explicit
        values[f.name] = _check_value(f"{where}.{f.name}", value, kind)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"params.yaml: {where}: {e}") from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()   # type: ignore[misc]


def _check_value(where: str, value: Any, kind: Any) -> Any:
    """Check `value` against the annotation `kind`; ints are fine floats, never bools."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(kind):
            try:
                return _check_value(where, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"params.yaml: {where}={value!r}: expected "
                          f"{' or '.join(_type_name(t) for t in typing.get_args(kind))}")
    if kind is type(None):
        if value is None:
            return None
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            if not value.strip():     # `root: ""` would silently mean the project folder
                raise ConfigError(f"params.yaml: {where} is empty: write a value (or `auto` where "
                                  f"the key has a default)")
            return value
    elif origin is tuple:
        args = typing.get_args(kind)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_check_value(f"{where}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args)))
    else:
        return value
    raise ConfigError(f"params.yaml: {where}={value!r}: expected {_type_name(kind)}")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return f"a list of {len(typing.get_args(kind))} numbers"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(kind, getattr(kind, "__name__", str(kind)))


# --- combinations --------------------------------------------------------------------------------
def _number(value: Any) -> str:
    """A value as the user wrote it: -1, not the -1.0 the float field made of it."""
    if isinstance(value, tuple):
        return "(" + ", ".join(_number(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _positive(where: str, value: float, minimum: float = 1) -> None:
    if value < minimum:
        raise ConfigError(f"params.yaml: {where}={value} must be >= {minimum}")


def check_combinations(run: RunConfig, wanted: set[str]) -> None:
    """Ranges and cross-parameter rules, each message naming what is allowed."""
    if "data" in wanted:
        d = run.data
        if d.split != AUTO and d.split not in SPLIT_RULES:
            raise ConfigError(f"params.yaml: data.split={d.split!r} is unknown; allowed: auto, "
                              f"{', '.join(SPLIT_RULES)}")
        if not 0 < d.split_fraction < 1:
            raise ConfigError(f"params.yaml: data.split_fraction={d.split_fraction} must be in (0, 1)")
        if not 0 <= d.split_seed < 2**63:
            raise ConfigError(f"params.yaml: data.split_seed={d.split_seed} must be in [0, 2**63)")
        _positive("data.synthetic.num_train", d.synthetic.num_train, 2)
        _positive("data.synthetic.num_test", d.synthetic.num_test)
        _positive("data.synthetic.image_size", d.synthetic.image_size, 8)
    if "search" in wanted:
        s = run.search
        for name, registry in (("optimisation", UPDATE_RULES), ("op_schedule", OP_SCHEDULES)):
            if getattr(s, name) not in registry:
                raise ConfigError(f"params.yaml: search.{name}={getattr(s, name)!r} is unknown; "
                                  f"allowed: {', '.join(registry.names())}")
        choices = {"step_order": ("alpha_first", "weights_first"), "features": ("trained", "random"),
                   "arch_sampling": ("cycle", "replacement"),
                   "single_level_data": ("half", "full"), "nonfinite": ("stop", "skip")}
        for name, allowed in choices.items():
            if getattr(s, name) not in allowed:
                raise ConfigError(f"params.yaml: search.{name}={getattr(s, name)!r}; allowed: "
                                  f"{', '.join(allowed)}")
        for name in ("epochs", "batch_size", "init_channels", "layers", "partial_channels", "valid_batch_size"):
            _positive(f"search.{name}", getattr(s, name))
        ranges = (     # (key, ok, rule): each optimiser value in the range torch and the spec mean
            ("lr", 0 < s.lr < math.inf, "> 0 and finite"),
            ("arch_lr", 0 < s.arch_lr < math.inf, "> 0 and finite"),
            ("momentum", 0 <= s.momentum < 1, "in [0, 1)"),
            ("nesterov", not s.nesterov or s.momentum > 0, "used with search.momentum > 0 only"),
            ("weight_decay", 0 <= s.weight_decay < math.inf, ">= 0"),
            ("arch_weight_decay", 0 <= s.arch_weight_decay < math.inf, ">= 0"),
            ("arch_betas", all(0 <= b < 1 for b in s.arch_betas), "two numbers in [0, 1)"),
            # a negative clip norm is no "off": torch scales every gradient by it, the loss climbs
            ("grad_clip", 0 <= s.grad_clip < math.inf, ">= 0 (0 = off)"),
            ("arch_grad_clip", 0 <= s.arch_grad_clip < math.inf, ">= 0 (0 = off)"),
            ("unrolled_eps", 0 < s.unrolled_eps < math.inf, "> 0 (the finite-difference step, DARTS 0.01)"),
            ("valid_every", s.valid_every >= 0, ">= 0 (0 = never)"),
            ("hessian_batches", s.hessian_batches >= 1, ">= 1"),
            ("hessian_iters", s.hessian_iters >= 1, ">= 1"),
            ("opp.skip_after_epoch", s.opp.skip_after_epoch >= 0, ">= 0"),
        )
        for name, ok, rule in ranges:
            if not ok:
                value = operator.attrgetter(name)(s)
                raise ConfigError(f"params.yaml: search.{name}={_number(value)} must be {rule}")
        if not 0 <= s.lr_min <= s.lr:
            raise ConfigError(f"params.yaml: search.lr_min={s.lr_min} must be in [0, search.lr={s.lr}]")
        if not 0 <= s.arch_warmup_epochs <= s.epochs:
            raise ConfigError(f"params.yaml: search.arch_warmup_epochs={s.arch_warmup_epochs} must be "
                              f"in [0, search.epochs={s.epochs}]")
        if s.init_channels % s.partial_channels:
            raise ConfigError(f"params.yaml: search.partial_channels (K={s.partial_channels}) must divide "
                              f"search.init_channels={s.init_channels}; e.g. K in "
                              f"{[k for k in range(1, s.init_channels + 1) if s.init_channels % k == 0]}")
        speed = speed_option_problems(s, None)     # the device is checked when the search starts
        if speed:
            raise ConfigError("params.yaml: " + "; ".join(speed))
        if not 0 <= s.drop_path < 1:
            raise ConfigError(f"params.yaml: search.drop_path={s.drop_path} must be in [0, 1)")
        if s.cutout < 0:
            raise ConfigError(f"params.yaml: search.cutout={s.cutout} must be >= 0 (0 = off)")
        if not 0 < s.opp.score_fraction <= 1:
            raise ConfigError(f"params.yaml: search.opp.score_fraction={s.opp.score_fraction} must be in (0, 1]")
        _positive("search.opp.stage_epochs", s.opp.stage_epochs)
        if "space" in wanted:
            sp = get_space(run.space)
            if s.op_schedule == "progressive" and sp.uniform_ops is None:
                raise ConfigError(f"params.yaml: op_schedule 'progressive' ({run.method}) needs one op list "
                                  f"on every edge; space {run.space!r} has per-edge lists. Use a space among "
                                  f"{', '.join(n for n in SPACES.names() if SPACES.get(n).uniform_ops)}")
            if sp.name != "nb201" and s.layers < 3:
                raise ConfigError(f"params.yaml: search.layers={s.layers}: the {sp.name} network needs >= 3 "
                                  f"cells (two are reduction cells)")
        if "data" in wanted and "profile" in wanted and "space" in wanted:
            for part, (images, where) in (_split_parts(run) or {}).items():
                if s.batch_size > images:
                    raise ConfigError(f"params.yaml: search.batch_size={s.batch_size} is larger than the "
                                      f"search's {part} split ({images} {where}, data.split="
                                      f"{split_rule(run.data.split, run.space, run.dataset)})")
    if "derive" in wanted and run.derive.rule != AUTO:
        if run.derive.rule not in DERIVATION_RULES:
            raise ConfigError(f"params.yaml: derive.rule={run.derive.rule!r} is unknown; allowed: auto, "
                              f"{', '.join(DERIVATION_RULES)}")
        if "space" in wanted:
            sp = get_space(run.space)
            if run.derive.rule not in sp.allowed_rules():
                raise ConfigError(f"params.yaml: derive.rule={run.derive.rule!r} cannot derive a "
                                  f"{run.space} cell; allowed for {run.space}: auto, {', '.join(sp.allowed_rules())}")
    if "retrain" in wanted:
        _check_network_section(run, "retrain", wanted)
    if "transfer" in wanted and run.transfer.data != "none":
        _check_network_section(run, "transfer", wanted)
    if "transfer" in wanted:
        t = run.transfer
        if t.data not in ("none", "synthetic") and not (t.data and user_path(t.data).exists()):
            raise ConfigError(f"params.yaml: transfer.data={t.data!r} does not exist; give an ImageFolder "
                              f"tree with train/<class>/ and val/<class>/ (the ImageNet layout), or "
                              f"'none' to skip the stage, or 'synthetic'")
        if t.data != "none":
            _positive("transfer.num_classes", t.num_classes, 2)
            _positive("transfer.workers", t.workers, 0)
            _positive("transfer.image_size", t.image_size, 32)
        if t.image_size % 32:
            raise ConfigError(f"params.yaml: transfer.image_size={t.image_size} must be a multiple of 32 "
                              f"(the ImageNet network halves it five times)")
        if "space" in wanted and run.space == "nb201" and t.data != "none":
            raise ConfigError("params.yaml: transfer.data must be 'none' for space nb201: the ImageNet "
                              "mobile network stacks DARTS cells, not NB201 cells")


def user_path(value: str) -> Path:
    """A path from params.yaml: absolute as is, else relative to the project root, which is where the
    stages read it from (a `dvc exp run --temp` workspace lacks the project's ignored data/)."""
    from .tracking import project_root

    path = Path(value).expanduser()
    return path if path.is_absolute() else project_root() / path


def _check_network_section(run: RunConfig, name: str, wanted: set[str]) -> None:
    sec: NetworkTrainConfig = getattr(run, name)
    for key in ("batch_size", "init_channels", "layers"):
        _positive(f"{name}.{key}", getattr(sec, key))
    if "space" in wanted and run.space != "nb201" and sec.layers < 3:
        raise ConfigError(f"params.yaml: {name}.layers={sec.layers}: the {run.space} network needs >= 3 cells "
                          f"(two are reduction cells)")
    if name == "retrain" and {"data", "profile", "dataset"} <= wanted:
        n_train = _train_size(run)
        if n_train is not None and sec.batch_size > n_train:
            raise ConfigError(f"params.yaml: retrain.batch_size={sec.batch_size} is larger than the "
                              f"training set ({n_train} images)")
    if sec.cutout < 0:
        raise ConfigError(f"params.yaml: {name}.cutout={sec.cutout} must be >= 0 (0 = off)")
    if sec.genotype != "derived":
        try:     # a file path is read from the project root, as the stage will (Paths.resolve_input)
            g = resolve_genotype(str(user_path(sec.genotype)) if Path(sec.genotype).suffix else sec.genotype)
        except GenotypeError as e:
            raise ConfigError(f"params.yaml: {name}.genotype: {e}; or 'derived' for the searched cell") from None
        if "space" in wanted and (isinstance(g, NB201Genotype)) != (run.space == "nb201"):
            raise ConfigError(f"params.yaml: {name}.genotype={sec.genotype!r} is a "
                              f"{'NB201' if isinstance(g, NB201Genotype) else 'DARTS'} cell but space is "
                              f"{run.space!r}")
    if name == "retrain" and sec.auxiliary and {"data", "profile", "dataset", "space"} <= wanted \
            and run.space != "nb201":
        size = run.data.synthetic.image_size if effective_dataset(run) == "synthetic" else \
            DATASETS.get(run.dataset).image_size
        if not _aux_head_fits(size):
            raise ConfigError(f"params.yaml: retrain.auxiliary: true needs images of >= 17 px (the head "
                              f"pools 5×5 over the map after two reductions); {effective_dataset(run)}'s "
                              f"are {size} px: set retrain.auxiliary: false")
    if "space" in wanted and run.space == "nb201" and sec.auxiliary:
        raise ConfigError(f"params.yaml: {name}.auxiliary must be false for space nb201 (its network "
                          f"has no auxiliary head)")
    if sec.train.cuda_graph and sec.train.nonfinite != "stop":
        raise ConfigError(f"params.yaml: {name}.train.cuda_graph: true needs {name}.train.nonfinite: stop "
                          f"(skipping a bad batch reads the loss on the host)")


def _aux_head_fits(image_size: int) -> bool:
    """Whether the CIFAR auxiliary head's 5×5 pool fits the map after the two reduction cells."""
    return math.ceil(math.ceil(image_size / 2) / 2) >= 5


def _train_size(run: RunConfig) -> int | None:
    if run.profile == "smoke" or run.dataset == "synthetic":
        return run.data.synthetic.num_train
    return DATASETS.get(run.dataset).train_size


def _split_parts(run: RunConfig) -> dict[str, tuple[int, str]] | None:
    """{"w": (images, where from), "α": ...} under data.split; None when the sizes are unknown."""
    n_train = _train_size(run)
    if n_train is None:
        return None
    if split_rule(run.data.split, run.space, run.dataset) == "test_half":
        synthetic = run.profile == "smoke" or run.dataset == "synthetic"
        n_test = run.data.synthetic.num_test if synthetic else DATASETS.get(run.dataset).test_size
        if n_test is None:
            return None
        return {"w": (n_train, "training images"), "α": (n_test // 2, f"of {n_test} test images")}
    w = int(math.floor(n_train * run.data.split_fraction))
    return {"w": (w, f"of {n_train} training images"), "α": (n_train - w, f"of {n_train} training images")}


# --- helpers for stages --------------------------------------------------------------------------
def to_dict(obj: Any) -> Any:
    """A resolved config as plain data (for JSON, MLflow params, checkpoint meta)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def config_hash(obj: Any) -> str:
    """A short, stable hash of a resolved config (keys scratch folders and checkpoints)."""
    text = json.dumps(to_dict(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def effective_dataset(run: RunConfig) -> str:
    """The dataset the data actually comes from: the smoke profile swaps in synthetic images."""
    return "synthetic" if run.profile == "smoke" else run.dataset


def read_keys(stage: str, params: Mapping[str, Any]) -> set[str]:
    """Every params key (dotted) that resolving `stage` reads — for the dvc.yaml declaration test."""
    log: set[str] = set()
    resolve_stage(stage, _Recorder(params, log))
    return log
