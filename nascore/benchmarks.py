"""NAS-Bench-201 accuracy table: look a derived cell up instead of training it (methods.md §1.3).

The table is a CSV in the format of ../shared/data/nb201-accuracy.csv: one row per architecture
of the space with its mean test accuracy (%) after 200 epochs on CIFAR-10, CIFAR-100 and
ImageNet16-120, and its canonical architecture string.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .genotype import GenotypeError, NB201Genotype

COLUMNS = {
    "cifar10": "CIFAR10TestAccuracy200Epochs",
    "cifar100": "CIFAR100TestAccuracy200Epochs",
    "imagenet16": "ImageNetTestAccuracy200Epochs",
}
ARCH_COLUMN = "ArchitectureString"


class BenchmarkTableError(ValueError):
    """A benchmark table that is missing, in another format, or lacks an architecture."""


@dataclass(frozen=True)
class NB201Entry:
    arch: str
    accuracy: dict[str, float]          # benchmark dataset -> mean test accuracy (%)


class NB201Table:
    """All architectures of the NB201 space with their benchmark accuracies."""

    def __init__(self, entries: dict[str, NB201Entry], source: str) -> None:
        self.entries, self.source = entries, source

    @classmethod
    def load(cls, path: str | Path) -> "NB201Table":
        path = Path(path)
        if not path.is_file():
            raise BenchmarkTableError(f"NB201 table {path} does not exist; set evaluate.nb201_table to "
                                      f"a CSV like ../shared/data/nb201-accuracy.csv, or none")
        expected = [ARCH_COLUMN, *COLUMNS.values()]
        entries: dict[str, NB201Entry] = {}
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = [c for c in expected if c not in (reader.fieldnames or [])]
                if missing:
                    raise BenchmarkTableError(
                        f"{path} is not an NB201 accuracy table: missing column(s) {', '.join(missing)}; "
                        f"expected a CSV with columns {', '.join(expected)}")
                for line, row in enumerate(reader, start=2):
                    try:
                        arch = NB201Genotype.from_arch_string(row[ARCH_COLUMN]).to_arch_string()
                        acc = {k: float(row[c]) for k, c in COLUMNS.items()}
                    except (GenotypeError, ValueError, TypeError) as e:
                        raise BenchmarkTableError(f"{path}, line {line}: {e}") from None
                    if not all(0.0 <= a <= 100.0 for a in acc.values()):
                        raise BenchmarkTableError(f"{path}, line {line}: accuracies must be percentages "
                                                  f"in [0, 100], got {acc}")
                    entries[arch] = NB201Entry(arch, acc)
        except UnicodeDecodeError:
            raise BenchmarkTableError(f"{path} is not a UTF-8 CSV file") from None
        except csv.Error as e:
            raise BenchmarkTableError(f"{path} is not a readable CSV file: {e}") from None
        if not entries:
            raise BenchmarkTableError(f"{path} has no architectures")
        return cls(entries, str(path))

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, genotype: NB201Genotype | str) -> NB201Entry:
        arch = genotype if isinstance(genotype, str) else genotype.to_arch_string()
        try:
            return self.entries[arch]
        except KeyError:
            raise BenchmarkTableError(f"architecture {arch} is not in {self.source} "
                                      f"({len(self)} architectures)") from None

    def accuracies(self, dataset: str) -> list[float]:
        return [e.accuracy[dataset] for e in self.entries.values()]

    def best(self, dataset: str) -> float:
        return max(self.accuracies(dataset))

    def mean(self, dataset: str) -> float:
        values = self.accuracies(dataset)
        return sum(values) / len(values)

    def fraction_better(self, accuracy: float, dataset: str) -> float:
        """Share of the space strictly better than `accuracy` (0 = the best cell)."""
        values = self.accuracies(dataset)
        return sum(v > accuracy for v in values) / len(values)
