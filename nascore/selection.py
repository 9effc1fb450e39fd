"""DARTS' selection protocol (methods.md §2.1): search several times with different seeds, train
each derived cell from scratch for a short while (⚠ 4 searches, 100 epochs), keep the cell with the
best accuracy, then train that one cell in full.

Both trainings are the retrain stage with other params (`sweeps/darts_selection.sh` runs the whole
protocol); this module only picks, from finished experiments that `compare` has read and grouped.
The accuracy is the retrain stage's test-set accuracy: DARTS' reference training script evaluates
on the CIFAR-10 test set and calls it "valid", so a cell picked this way is, as in the paper, picked
on the set its final error is reported on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .compare import CompareError, Group
from .genotype import GenotypeError, genotype_from_json
from .io import write_json, write_text

METRIC = "retrain_acc"
NARROW = ("--method/--space/--dataset/--profile/--seed/--exp, or --param KEY=VALUE "
          "(e.g. --param retrain.train.epochs=100)")


@dataclass(frozen=True)
class Candidate:
    """One searched cell and its short training's result."""

    experiment: str
    seed: int
    accuracy: float               # retrained test accuracy (%)
    epochs: int | None            # how long it was retrained
    genotype: dict[str, Any]      # genotype JSON, as derive writes it

    @property
    def genotype_str(self) -> str:
        return str(genotype_from_json(self.genotype))


@dataclass(frozen=True)
class Selection:
    """The ranking of one group's candidates, best first (ties: the lower seed)."""

    group: Group
    ranked: tuple[Candidate, ...]
    unfinished: tuple[str, ...]   # the group's experiments with no retrain accuracy or genotype

    @property
    def chosen(self) -> Candidate:
        return self.ranked[0]

    @property
    def where(self) -> str:
        g = self.group
        return f"{g.label} on {g.space} / {g.dataset} ({g.profile})"


def _describe(g: Group) -> str:
    return (f"{g.label} on {g.space}/{g.dataset}/{g.profile}"
            f" (seeds {', '.join(map(str, g.seeds))})")


def select_cell(groups: Sequence[Group]) -> Selection:
    """Rank the retrained cells of the one group that has retrain results.

    Several such groups (other methods, datasets, or params that differ, e.g. a 100-epoch and a
    600-epoch retrain) are refused, naming them: the protocol compares seeds of one setting.
    """
    trained = [g for g in groups if any(METRIC in e.metrics for e in g.experiments)]
    if not trained:
        raise CompareError("--select: no experiment has a retrained accuracy; run the candidates up to the "
                           "retrain stage first, e.g.\n  dvc exp run --queue -S seed=1,2,3,4 "
                           "-S retrain.train.epochs=100 retrain\n(or sweeps/darts_selection.sh)")
    if len(trained) > 1:
        raise CompareError(f"--select picks among the seeds of one setting; these experiments form "
                           f"{len(trained)}: {'; '.join(_describe(g) for g in trained)}. Keep one with "
                           f"{NARROW}")
    group = trained[0]
    ranked, unfinished = [], []
    for e in group.experiments:
        accuracy = e.metrics.get(METRIC)
        if accuracy is None or e.genotype is None:
            unfinished.append(e.name)
            continue
        try:
            genotype_from_json(e.genotype)
        except GenotypeError as err:
            raise CompareError(f"--select: experiment {e.name}'s genotype is unreadable ({err})") from None
        epochs = e.metrics.get("retrain_epochs")
        ranked.append(Candidate(e.name, e.seed, accuracy, None if epochs is None else int(epochs), e.genotype))
    lengths = sorted({c.epochs for c in ranked if c.epochs is not None})
    if len(lengths) > 1:
        raise CompareError(f"--select: the candidates were retrained for different numbers of epochs "
                           f"({', '.join(map(str, lengths))}); compare like with like: "
                           f"--param retrain.train.epochs=N")
    ranked.sort(key=lambda c: (-c.accuracy, c.seed, c.experiment))
    return Selection(group, tuple(ranked), tuple(unfinished))


def write_selection(selection: Selection, out: Path) -> list[Path]:
    """selection.json (the ranking), selected_genotype.json (the chosen cell, a file that
    `retrain.genotype` accepts) and selection.md, in `out`."""
    chosen = selection.chosen
    paths = [out / "selection.json", out / "selected_genotype.json", out / "selection.md"]
    write_json(paths[0], {
        "protocol": "DARTS: the best retrained test accuracy after a short training from scratch",
        "metric": METRIC, "group": selection.where, "chosen": asdict(chosen),
        "candidates": [asdict(c) for c in selection.ranked], "unfinished": list(selection.unfinished)})
    write_json(paths[1], chosen.genotype)
    rows = [f"| {rank} | {c.seed} | {c.experiment} | {c.accuracy:.2f} | "
            f"{'–' if c.epochs is None else c.epochs} | `{c.genotype_str}` |"
            for rank, c in enumerate(selection.ranked, 1)]
    lines = ["# Cell selection (DARTS protocol)", "",
             f"{len(selection.ranked)} searched cell(s) of {selection.where}, each trained from scratch; "
             f"the best retrained test accuracy wins (ties: the lower seed).", "",
             "| rank | seed | experiment | retrained test acc. (%) | epochs | genotype |",
             "|---|---|---|---|---|---|", *rows, "",
             f"**Chosen: seed {chosen.seed}** ({chosen.experiment}, {chosen.accuracy:.2f} %), written to "
             f"`selected_genotype.json`.", "",
             "Train it in full: rerun the chosen experiment with the recipe's retrain length (DVC's run "
             "cache restores its prepare, search and derive outputs), or train the cell in any run with "
             f"`retrain.genotype: {paths[1]}`.", ""]
    if selection.unfinished:
        lines += [f"Not ranked (no retrained accuracy or genotype): {', '.join(selection.unfinished)}.", ""]
    write_text(paths[2], "\n".join(lines))
    return paths


__all__ = ["Candidate", "Selection", "select_cell", "write_selection"]
