from pathlib import Path

import pytest

from nascore.benchmarks import BenchmarkTableError, NB201Table
from nascore.genotype import NB201Genotype

SHARED_TABLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nb201-accuracy.csv"
HEADER = ("CIFAR10TestAccuracy200Epochs,CIFAR100TestAccuracy200Epochs,ImageNetTestAccuracy200Epochs,"
          "ArchitectureString,UniqueString\n")
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
GOOD = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"


def write_table(tmp_path, rows, header=HEADER):
    path = tmp_path / "t.csv"
    path.write_text(header + "".join(rows))
    return path


def test_lookup_and_statistics_on_a_small_table(tmp_path):
    path = write_table(tmp_path, [f"54.3,15.6,16.3,{ALL_SKIP},a\n", f"94.36,73.51,46.34,{GOOD},b\n"])
    table = NB201Table.load(path)
    assert len(table) == 2
    assert table.lookup(NB201Genotype.from_arch_string(GOOD)).accuracy["cifar100"] == 73.51
    assert table.best("cifar10") == 94.36
    assert table.mean("imagenet16") == pytest.approx((16.3 + 46.34) / 2)
    assert table.fraction_better(54.3, "cifar10") == 0.5
    missing = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    with pytest.raises(BenchmarkTableError, match="not in"):
        table.lookup(missing)


@pytest.mark.parametrize("content, message", [
    ("a,b,c\n1,2,3\n", "missing column"),
    (HEADER + "x,15.6,16.3," + ALL_SKIP + ",a\n", "line 2"),
    (HEADER + "54.3,15.6,16.3,|conv~0|+|x~0|y~1|+|a~0|b~1|c~2|,a\n", "line 2"),
    (HEADER + "154.3,15.6,16.3," + ALL_SKIP + ",a\n", "percentages"),
    (HEADER, "no architectures"),
])
def test_tables_in_the_wrong_format_are_rejected(tmp_path, content, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(BenchmarkTableError, match=message):
        NB201Table.load(path)


def test_missing_and_binary_tables(tmp_path):
    with pytest.raises(BenchmarkTableError, match="does not exist"):
        NB201Table.load(tmp_path / "nope.csv")
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BenchmarkTableError):
        NB201Table.load(path)


@pytest.mark.skipif(not SHARED_TABLE.exists(), reason="../shared/data/nb201-accuracy.csv absent")
def test_the_shared_table_has_the_documented_reference_points():
    table = NB201Table.load(SHARED_TABLE)
    assert len(table) == 15625
    # the data README's figures are rounded to 2 decimals
    assert table.best("cifar10") == pytest.approx(94.37, abs=0.005)
    assert table.best("cifar100") == pytest.approx(73.51, abs=0.005)
    assert table.best("imagenet16") == pytest.approx(47.31, abs=0.005)
    assert table.lookup(ALL_SKIP).accuracy["cifar10"] == pytest.approx(54.30, abs=0.01)
    assert table.mean("cifar10") == pytest.approx(87.06, abs=0.01)
