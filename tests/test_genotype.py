import csv
import json
from pathlib import Path

import pytest

from nascore.genotype import (
    DARTS_V2, PUBLISHED_GENOTYPES, Genotype, GenotypeError, NB201Genotype, alpha_entropy,
    derive_darts_cell, derive_nb201_cell, genotype_from_json, genotype_from_text, load_genotype,
    resolve_genotype)

NB201_CSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nb201-accuracy.csv"
DARTS_OPS = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
             "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]


def test_published_genotypes_are_the_spec_cells():
    assert set(PUBLISHED_GENOTYPES) >= {"DARTS_V1", "DARTS_V2", "PC_DARTS_cifar", "PC_DARTS_image",
                                        "OPP_DARTS"}
    assert DARTS_V2.normal[:2] == (("sep_conv_3x3", 0), ("sep_conv_3x3", 1))
    assert DARTS_V2.normal[-1] == ("dil_conv_3x3", 2)
    assert DARTS_V2.reduce[3] == ("max_pool_3x3", 1)
    assert DARTS_V2.normal_concat == (2, 3, 4, 5)
    # collapse indicator: DARTS_V2 normal cell has 2 skip_connects; the reduce cell is all param-free
    assert DARTS_V2.num_parameter_free("normal") == 2
    assert DARTS_V2.num_parameter_free("reduce") == 8


@pytest.mark.parametrize("name", sorted(PUBLISHED_GENOTYPES))
def test_json_round_trip(name, tmp_path):
    g = PUBLISHED_GENOTYPES[name]
    text = json.dumps(g.to_json())
    assert genotype_from_text(text) == g
    path = tmp_path / "g.json"
    path.write_text(text)
    assert load_genotype(path) == g
    assert resolve_genotype(name) is g
    assert resolve_genotype(str(path)) == g


@pytest.mark.parametrize("text, message", [
    ("Genotype(normal=[('sep_conv_3x3', 0)])", "must be JSON"),
    ("__import__('os').system('echo pwned')", "must be JSON"),
    ('{"type": "darts_cell", "normal": [["sep_conv_3x3", 0]], "reduce": []}', "needs 8"),
    ('{"type": "darts_cell", "normal": ' + json.dumps([["conv_9x9", 0]] * 8) + ', "reduce": '
     + json.dumps([["skip_connect", 0]] * 8) + '}', "unknown op 'conv_9x9'"),
    ('{"type": "darts_cell", "normal": ' + json.dumps([["skip_connect", 5]] * 8) + ', "reduce": '
     + json.dumps([["skip_connect", 0]] * 8) + '}', "input 5 out of range"),
    ('{"type": "darts_cell", "normal": ' + json.dumps([["skip_connect", "0"]] * 8) + ', "reduce": '
     + json.dumps([["skip_connect", 0]] * 8) + '}', "is not an [op_name, input_index] pair"),
    ('{"type": "resnet"}', "'darts_cell' or 'nb201_cell'"),
    ('[1, 2, 3]', "must be a JSON object"),
    ('{"type": "nb201_cell", "arch": "|nor_conv_3x3~0|+|nor_conv_3x3~0|+|x~0|"}', "node 2 needs 2 edges"),
    ('{"type": "nb201_cell", "arch": "|conv_7x7~0|+|none~0|none~1|+|none~0|none~1|none~2|"}',
     "unknown op 'conv_7x7'"),
    ('{"type": "nb201_cell", "arch": "|none~1|+|none~0|none~1|+|none~0|none~1|none~2|"}', "'op~0'"),
])
def test_malformed_genotypes_are_rejected_as_data(text, message, tmp_path):
    with pytest.raises(GenotypeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        genotype_from_text(text)
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(GenotypeError, match=str(path)):
        load_genotype(path)


def test_missing_and_unknown_references():
    with pytest.raises(GenotypeError, match="does not exist"):
        load_genotype("/nonexistent/genotype.json")
    with pytest.raises(GenotypeError, match="DARTS_V2"):
        resolve_genotype("DARTS_V9")


def test_nb201_string_round_trip_and_edge_order():
    s = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
    g = NB201Genotype.from_arch_string(s)
    assert g.ops == ("nor_conv_3x3", "nor_conv_3x3", "nor_conv_3x3", "skip_connect",
                     "nor_conv_3x3", "nor_conv_3x3")
    assert g.to_arch_string() == s
    assert genotype_from_json(g.to_json()) == g
    assert g.num_parameter_free() == 1


@pytest.mark.skipif(not NB201_CSV.exists(), reason="../shared/data/nb201-accuracy.csv absent")
def test_nb201_strings_from_the_benchmark_table_round_trip():
    with open(NB201_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15625
    strings = {r["ArchitectureString"] for r in rows}
    for s in strings:
        assert NB201Genotype.from_arch_string(s).to_arch_string() == s
    assert len(strings) == 15625


def test_an_nb201_cell_whose_paths_all_pass_none_ignores_its_input():
    cut = NB201Genotype.from_arch_string(          # the input feeds only `none` edges
        "|none~0|+|none~0|nor_conv_3x3~1|+|none~0|nor_conv_3x3~1|nor_conv_1x1~2|")
    assert not cut.input_reaches_output()
    assert NB201Genotype.from_arch_string(         # one path: 0 -> 1 -> 3
        "|skip_connect~0|+|none~0|none~1|+|none~0|avg_pool_3x3~1|none~2|").input_reaches_output()
    assert not NB201Genotype.from_arch_string(     # 0 -> 1, but node 1 leads nowhere
        "|skip_connect~0|+|none~0|none~1|+|none~0|none~1|nor_conv_3x3~2|").input_reaches_output()


@pytest.mark.skipif(not NB201_CSV.exists(), reason="../shared/data/nb201-accuracy.csv absent")
def test_the_benchmark_scores_exactly_the_cells_cut_off_from_their_input_at_chance():
    with open(NB201_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    reaches = {r["ArchitectureString"]: NB201Genotype.from_arch_string(r["ArchitectureString"]).input_reaches_output()
               for r in rows}
    accuracy = {r["ArchitectureString"]: float(r["CIFAR10TestAccuracy200Epochs"]) for r in rows}
    assert sum(not ok for ok in reaches.values()) == 341
    assert {accuracy[a] for a, ok in reaches.items() if not ok} == {10.0}
    assert min(accuracy[a] for a, ok in reaches.items() if ok) > 40


def test_darts_rule_on_hand_built_weights():
    # node 0: edges 0,1; node 1: edges 2,3,4; ... W rows = edges, columns = DARTS_OPS
    W = [[0.0] * 8 for _ in range(14)]
    W[0][0] = 0.9; W[0][4] = 0.05        # strong `none` is ignored: edge 0 scores 0.05
    W[1][6] = 0.3                          # node 0 keeps edges 1 (0.3) then 0 (0.05)
    W[2][3] = 0.5; W[3][5] = 0.5; W[4][7] = 0.1   # tie 2 vs 3 -> lower input first
    W[5][1] = 0.2; W[6][2] = 0.4; W[7][3] = 0.1; W[8][4] = 0.6
    W[9][5] = 0.1; W[10][5] = 0.1; W[11][5] = 0.1; W[12][6] = 0.7; W[13][7] = 0.7
    names = [DARTS_OPS] * 14
    cell = derive_darts_cell(W, names)
    assert cell == (("dil_conv_3x3", 1), ("sep_conv_3x3", 0),
                    ("skip_connect", 0), ("sep_conv_5x5", 1),
                    ("sep_conv_3x3", 3), ("avg_pool_3x3", 1),
                    ("dil_conv_3x3", 3), ("dil_conv_5x5", 4))
    assert all(op != "none" for op, _ in cell)


def test_darts_rule_per_edge_op_lists():
    # S1-style per-edge lists: names follow each edge's own columns
    names = [("skip_connect", "dil_conv_3x3")] * 14
    W = [[0.4, 0.6]] * 14
    cell = derive_darts_cell(W, names)
    assert {op for op, _ in cell} == {"dil_conv_3x3"}


def test_nb201_rule_includes_none():
    W = [[0.5, 0.1, 0.1, 0.2, 0.1]] + [[0.1, 0.1, 0.1, 0.6, 0.1]] * 5
    g = derive_nb201_cell(W, [["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]] * 6)
    assert g.ops[0] == "none"
    assert g.ops[1:] == ("nor_conv_3x3",) * 5


def test_alpha_entropy_uniform_is_log_k():
    import math
    assert alpha_entropy([[0.25] * 4, [0.25] * 4]) == pytest.approx(math.log(4))
    assert alpha_entropy([[1.0, 0.0]]) == 0.0


def test_genotype_constructor_validates():
    with pytest.raises(GenotypeError, match="concat"):
        Genotype(normal=DARTS_V2.normal, reduce=DARTS_V2.reduce, normal_concat=(2, 2))
    # a reduction cell's inputs are at twice its nodes' resolution: refused here, not in a network
    with pytest.raises(GenotypeError, match=r"reduce_concat \[0, 2, 3, 4, 5\] contains a cell input"):
        Genotype(normal=DARTS_V2.normal, reduce=DARTS_V2.reduce, reduce_concat=(0, 2, 3, 4, 5))
    assert Genotype(normal=DARTS_V2.normal, reduce=DARTS_V2.reduce, normal_concat=(0, 2, 3, 4, 5))
