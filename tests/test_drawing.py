"""nascore.drawing: the .dot source is right and always written; rendering only with `dot`."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from nascore import drawing
from nascore.genotype import PUBLISHED_GENOTYPES, NB201Genotype

NB201_ARCH = "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|none~1|nor_conv_1x1~2|"
EDGE = re.compile(r'^\s*"?([^"\s]+)"?\s*->\s*"?([^"\s]+)"?\s*(?:\[(.*)\])?\s*$')


def edges(dot_text: str) -> list[tuple[str, str, str | None]]:
    out = []
    for line in dot_text.splitlines():
        m = EDGE.match(line)
        if m:
            label = re.search(r'label="?([\w]+)"?', m.group(3) or "")
            out.append((m.group(1), m.group(2), label.group(1) if label else None))
    return out


def expected_darts_edges(pairs) -> list[tuple[str, str, str]]:
    names = ["c_{k-2}", "c_{k-1}", "0", "1", "2", "3"]
    return [(names[j], str(k // 2), op) for k, (op, j) in enumerate(pairs)]


@pytest.fixture
def no_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drawing.shutil, "which", lambda name: None)


@pytest.mark.parametrize("cell", ["normal", "reduce"])
def test_darts_v2_dot_source(tmp_path: Path, no_dot: None, cell: str) -> None:
    g = PUBLISHED_GENOTYPES["DARTS_V2"]
    result = drawing.draw_cell(g, cell, tmp_path / cell)
    text = result.dot_path.read_text()
    assert result.dot_path == tmp_path / f"{cell}.dot" and result.rendered == []
    for node in ("c_{k-2}", "c_{k-1}", "c_{k}"):
        assert f'"{node}"' in text
    found = edges(text)
    assert [e for e in found if e[2]] == expected_darts_edges(getattr(g, cell))
    assert sorted(a for a, b, lab in found if b == "c_{k}") == ["0", "1", "2", "3"]   # concat
    # the note: one line saying only .dot was written and how to get `dot`
    assert result.note and "\n" not in result.note and "apt-get install graphviz" in result.note
    assert "brew install graphviz" in result.note and f"{cell}.dot" in result.note


def test_nb201_dot_omits_none_edges(tmp_path: Path, no_dot: None) -> None:
    results = drawing.draw_genotype(NB201Genotype.from_arch_string(NB201_ARCH), tmp_path)
    assert len(results) == 1 and results[0].dot_path == tmp_path / "cell.dot"
    found = edges(results[0].dot_path.read_text())
    assert found == [("0", "1", "nor_conv_3x3"), ("1", "2", "skip_connect"),
                     ("0", "3", "avg_pool_3x3"), ("2", "3", "nor_conv_1x1")]


def test_dot_source_without_graphviz_package(tmp_path: Path, no_dot: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    g = PUBLISHED_GENOTYPES["DARTS_V2"]
    with_pkg = edges(drawing.cell_graph_source(g, "normal"))
    monkeypatch.setitem(sys.modules, "graphviz", None)          # the package is missing
    result = drawing.draw_cell(g, "normal", tmp_path / "normal")
    assert edges(result.dot_path.read_text()) == with_pkg


def test_bad_cell_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed: normal, reduce"):
        drawing.draw_cell(PUBLISHED_GENOTYPES["DARTS_V2"], "cell", tmp_path / "x")
    with pytest.raises(ValueError, match="allowed: cell"):
        drawing.draw_cell(NB201Genotype.from_arch_string(NB201_ARCH), "normal", tmp_path / "x")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` not installed")
def test_rendering_with_dot(tmp_path: Path) -> None:
    results = drawing.draw_genotype(PUBLISHED_GENOTYPES["PC_DARTS_cifar"], tmp_path / "cells")
    assert [r.note for r in results] == [None, None]
    for r, cell in zip(results, ("normal", "reduce")):
        svg, png = r.rendered
        assert svg == tmp_path / "cells" / f"{cell}.svg" and "<svg" in svg.read_text()
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = drawing.draw_cell(PUBLISHED_GENOTYPES["DARTS_V2"], "normal", tmp_path / "n",
                            formats=("nosuchformat",))
    assert bad.rendered == [] and bad.note and "\n" not in bad.note and bad.dot_path.is_file()
