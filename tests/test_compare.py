"""`compare`: methods × seeds from finished experiments to one report.

Fast tests build reports from hand-made experiments (aggregation, NB201 lookup, the papers'
columns, the collapse sentence). The slow tests run ONE 2-method × 2-seed smoke sweep through
DVC's real queue (`dvc exp run --queue -S method=a,b -S seed=1,2`, `dvc queue start -j 2`) in a
temporary repository, and rebuild the report from it three ways: DVC + MLflow, DVC alone with
MLflow unreachable, MLflow alone after `dvc exp remove --all`.
"""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nascore.compare import (
    EXPERIMENT_COLUMNS, CompareError, CompareOptions, Experiment, Filters, PaperClaim, build_report,
    cell_stats, collapse_verdicts, compare, genotype_from_str, group_experiments, load_paper_results,
    mean_std, normalise_metrics)
from nascore.genotype import PUBLISHED_GENOTYPES, GenotypeError, NB201Genotype

ROOT = Path(__file__).resolve().parents[1]
METHODS_MD = ROOT.parent / "shared" / "docs" / "methods.md"
# the smoke sweep's cells are looked up in the shared table (evaluate.nb201_table: auto) when present
HAVE_TABLE = (ROOT.parent / "shared" / "data" / "nb201-accuracy.csv").exists()
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
MIXED = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|avg_pool_3x3~0|nor_conv_3x3~1|none~2|"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- hand-made inputs ---------------------------------------------------------------------------
def nb201_table(path: Path) -> Path:
    """A 4-cell NB201 table in the shared CSV's format (accuracies made up, all-skip as in NB201)."""
    rows = [(54.30, 15.61, 16.32, ALL_SKIP), (94.37, 73.51, 47.31, BEST), (90.00, 70.00, 40.00, MIXED),
            (80.00, 50.00, 30.00, "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["CIFAR10TestAccuracy200Epochs", "CIFAR100TestAccuracy200Epochs",
                    "ImageNetTestAccuracy200Epochs", "ArchitectureString", "UniqueString"])
        for c10, c100, in16, arch in rows:
            w.writerow([c10, c100, in16, arch, "x"])
    return path


def darts_cell(normal_op: str, reduce_op: str = "max_pool_3x3") -> dict:
    pairs = lambda op: [[op, j] for j in (0, 1, 0, 1, 0, 1, 0, 1)]
    return {"type": "darts_cell", "normal": pairs(normal_op), "normal_concat": [2, 3, 4, 5],
            "reduce": pairs(reduce_op), "reduce_concat": [2, 3, 4, 5]}


def s2_alpha_history(skip_weight: list[float]) -> list[dict]:
    """Per epoch, S2's 14 edges × [skip_connect, sep_conv_3x3] with the given skip weight."""
    names = [["skip_connect", "sep_conv_3x3"]] * 14
    return [{"alphas": {"normal": [[w, 1 - w]] * 14, "reduce": [[0.5, 0.5]] * 14},
             "op_names": {"normal": names, "reduce": names}} for w in skip_weight]


def experiment(method: str, seed: int, *, space: str = "nb201", genotype: dict | None = None,
               metrics: dict | None = None, series: dict | None = None, alpha_history=None,
               params: dict | None = None, profile: str = "full") -> Experiment:
    return Experiment(name=f"{method}-{space}-{seed}", method=method, space=space, dataset="cifar10",
                      seed=seed, profile=profile, source="test", genotype=genotype,
                      metrics=dict(metrics or {}), series=dict(series or {}), alpha_history=alpha_history,
                      params=dict(params or {}), nb201_table="none")


def nb201_exp(method: str, seed: int, arch: str, **kw) -> Experiment:
    pf = NB201Genotype.from_arch_string(arch).num_parameter_free()
    return experiment(method, seed, genotype={"type": "nb201_cell", "arch": arch},
                      series={"param_free_ops": [2.0, 3.0, float(pf)]}, **kw)


def png_ok(path: Path) -> None:
    """A real, non-blank image: PNG signature, sensible size, pixels that vary."""
    from PIL import Image
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, (path, pixels.shape)
    assert pixels.var() > 50, (path, pixels.var())          # a blank canvas has ~0


# --- aggregation ---------------------------------------------------------------------------------
def test_mean_std_is_the_sample_std_and_skips_missing_values():
    st = mean_std([1.0, 2.0, None, 3.0, float("nan")])
    assert st.n == 3 and st.mean == pytest.approx(2.0) and st.std == pytest.approx(1.0)
    assert st.text(2) == "2.00 ± 1.00"
    assert st.best("higher") == 3.0 and st.best("lower") == 1.0 and st.best(None) is None
    one = mean_std([94.37])
    assert one.std is None and one.text(2) == "94.37 (n=1)"
    assert mean_std([None, float("nan")]) is None


def test_normalise_metrics_puts_the_pipeline_metrics_in_the_papers_units():
    m = normalise_metrics({
        "search": {"search_seconds": 8640.0, "epochs": 50, "valid_acc": 0.8, "peak_memory_mb": 5632.0},
        "derive": {"param_free_ops": 3, "arch": "|…|"},
        "retrain": {"top1": 0.9724, "error": 2.76, "epochs": 600, "params_m": 3.349342, "macs_m": 530.1},
        "transfer_imagenet": {"top1": 0.733, "top5": 0.913, "params_m": 4.72, "macs_m": 574.0},
        "evaluate": {"nb201_cifar10": 54.3}})
    assert m["retrain_acc"] == pytest.approx(97.24) and m["retrain_error"] == 2.76
    assert m["search_gpu_days"] == pytest.approx(0.1) and m["search_epochs"] == 50
    assert m["search_memory_gb"] == 5.5
    # the evaluate stage's copy (MLflow's final metrics); a CPU run measured none
    assert normalise_metrics({"evaluate": {"search_peak_memory_mb": 2048}})["search_memory_gb"] == 2.0
    assert "search_memory_gb" not in normalise_metrics({"search": {"peak_memory_mb": None}})
    assert m["imagenet_top1_error"] == pytest.approx(26.7) and m["imagenet_top5_error"] == pytest.approx(8.7)
    assert m["imagenet_params_m"] == 4.72 and m["nb201_cifar10"] == 54.3 and m["param_free_ops"] == 3
    # a skipped transfer stage and missing stages give no numbers, not zeros
    assert "imagenet_top1_error" not in normalise_metrics({"transfer_imagenet": {"skipped": True}})
    assert normalise_metrics({}) == {}


def test_cell_stats_count_the_collapse_op_in_the_normal_cell():
    s = cell_stats(darts_cell("skip_connect", "max_pool_3x3"), "s2")
    assert s == {"param_free_ops": 16.0, "param_free_ops_normal": 8.0, "param_free_ops_reduce": 8.0,
                 "collapse_share": 1.0}
    assert cell_stats(darts_cell("sep_conv_3x3"), "s3")["collapse_share"] == 0.0
    assert cell_stats(darts_cell("noise"), "s4")["collapse_share"] == 1.0       # S4 collapses to noise
    nb = cell_stats({"type": "nb201_cell", "arch": MIXED}, "nb201")
    assert nb["param_free_ops"] == 3.0 and nb["collapse_share"] == pytest.approx(1 / 6)
    assert nb["cut_off"] == 0.0                                 # 0 -> 3 through avg_pool_3x3
    cut = cell_stats({"type": "nb201_cell", "arch": "|none~0|+|none~0|nor_conv_3x3~1|+|none~0|nor_conv_3x3~1|avg_pool_3x3~2|"},
                     "nb201")
    assert cut["cut_off"] == 1.0


def test_the_genotype_tag_parses_back_to_the_cell():
    # MLflow's `genotype` tag (str of the cell) is the last resort when no genotype.json is stored
    for g in (PUBLISHED_GENOTYPES["DARTS_V2"], NB201Genotype.from_arch_string(MIXED)):
        assert genotype_from_str(str(g)) == g
    with pytest.raises(GenotypeError):
        genotype_from_str("not a cell")


def test_groups_are_method_x_space_x_dataset_x_profile_and_other_params_make_variants():
    exps = [experiment("darts", s, params={"seed": str(s), "search.epochs": "50", "derive.rule": "auto"})
            for s in (1, 2)]
    exps += [experiment("darts", 3, params={"seed": "3", "search.epochs": "10", "derive.rule": "darts"}),
             experiment("rf_darts", 1, params={"search.epochs": "50"}),
             experiment("darts", 1, profile="smoke")]
    groups = group_experiments(exps)
    labels = [(g.method, g.profile, g.variant, g.seeds) for g in groups]
    # "auto" matches any value (derive.rule), the seed never splits, search.epochs does
    assert ("darts", "full", "search.epochs=50", [1, 2]) in labels
    assert ("darts", "full", "search.epochs=10", [3]) in labels
    assert ("rf_darts", "full", "", [1]) in labels and ("darts", "smoke", "", [1]) in labels
    assert len(groups) == 4


def test_a_seed_run_twice_is_one_sample_and_the_report_names_the_repeat(tmp_path):
    table = nb201_table(tmp_path / "nb201.csv")
    exps = [nb201_exp("darts", 1, ALL_SKIP), nb201_exp("darts", 2, BEST)]
    again = nb201_exp("darts", 1, ALL_SKIP)
    again.name = "darts-rerun-of-seed-1"        # another `dvc exp run -S seed=1`, another name
    report = build_report([*exps, again], tmp_path / "report", name="t", root=tmp_path,
                          paper=load_paper_results(), nb201_table=str(table))
    [g] = report.groups
    assert g.seeds == [1, 2] and [e.name for e in g.repeats] == ["darts-rerun-of-seed-1"]
    assert g.stat("nb201_cifar10").n == 2
    assert g.stat("nb201_cifar10").mean == pytest.approx((54.30 + 94.37) / 2)
    [note] = [n for n in report.notes if "seed 1 ran 2 times" in n]
    assert "darts-nb201-1" in note and "darts-rerun-of-seed-1" in note
    assert "seed 1 ran 2 times" in report.markdown.read_text()
    # every run stays listed in table.csv; only the statistics count the seed once
    rows = list(csv.DictReader(open(tmp_path / "report" / "table.csv")))
    assert [(r["experiment"], r["counted"]) for r in rows] == [
        ("darts-nb201-1", "True"), ("darts-rerun-of-seed-1", "False"), ("darts-nb201-2", "True")]


def test_a_smoke_group_is_shown_on_synthetic_data(tmp_path):
    exps = [nb201_exp("darts", 1, ALL_SKIP, profile="smoke"), nb201_exp("darts", 1, ALL_SKIP)]
    report = build_report(exps, tmp_path / "report", name="t", root=tmp_path, paper=load_paper_results())
    rows = [line for line in report.markdown.read_text().splitlines() if line.startswith("| darts |")]
    assert any("cifar10 (synthetic stand-in) | smoke" in r for r in rows)
    assert any("| cifar10 | full" in r for r in rows)


# --- the NB201 lookup -----------------------------------------------------------------------------
def test_nb201_accuracy_is_looked_up_and_aggregated_over_seeds(tmp_path):
    table = nb201_table(tmp_path / "nb201.csv")
    exps = [nb201_exp("darts", 1, ALL_SKIP), nb201_exp("darts", 2, ALL_SKIP),
            nb201_exp("rf_darts", 1, BEST), nb201_exp("rf_darts", 2, MIXED)]
    report = build_report(exps, tmp_path / "report", name="t", root=tmp_path, paper=load_paper_results(),
                          nb201_table=str(table))
    by = {g.method: g for g in report.groups}
    assert by["darts"].stat("nb201_cifar10").mean == pytest.approx(54.30)
    assert by["darts"].stat("nb201_cifar10").std == pytest.approx(0.0)
    rf = by["rf_darts"].stat("nb201_cifar10")
    assert rf.mean == pytest.approx(92.185) and rf.std == pytest.approx(np.std([94.37, 90.0], ddof=1))
    assert by["rf_darts"].stat("nb201_imagenet16").values == (47.31, 40.0)
    summary = list(csv.DictReader(open(tmp_path / "report" / "summary.csv")))
    rf_row = next(r for r in summary if r["method"] == "rf_darts")
    assert float(rf_row["nb201_cifar10_mean"]) == pytest.approx(92.185)
    assert float(rf_row["nb201_cifar10_best"]) == pytest.approx(94.37)
    for bench in ("cifar10", "cifar100", "imagenet16"):
        png_ok(tmp_path / "report" / f"nb201_{bench}.png")


def test_a_search_on_imagenet16_120_shows_that_benchmark_column_per_seed(tmp_path):
    table = nb201_table(tmp_path / "nb201.csv")
    e = nb201_exp("darts", 1, MIXED)
    e.dataset = "imagenet16_120"
    build_report([e], tmp_path / "r", name="t", root=tmp_path, paper=load_paper_results(),
                 nb201_table=str(table))
    text = (tmp_path / "r" / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| darts | nb201 | imagenet16_120 | 1 |"))
    assert "| 40.00 |" in row and "| 90.00 |" not in row          # MIXED: IN16 40.00, CIFAR-10 90.00


def test_a_cell_missing_from_the_table_is_a_note_not_a_crash(tmp_path):
    table = nb201_table(tmp_path / "nb201.csv")
    other = "|nor_conv_1x1~0|+|nor_conv_1x1~0|nor_conv_1x1~1|+|nor_conv_1x1~0|nor_conv_1x1~1|nor_conv_1x1~2|"
    report = build_report([nb201_exp("darts", 1, other)], tmp_path / "r", name="t", root=tmp_path,
                          paper=load_paper_results(), nb201_table=str(table))
    assert any("is not in" in n for n in report.notes)
    assert "nb201_cifar10" not in report.experiments[0].metrics
    with pytest.raises(CompareError, match="nb201-table"):
        build_report([nb201_exp("darts", 1, BEST)], tmp_path / "r2", name="t", root=tmp_path,
                     paper=load_paper_results(), nb201_table=str(tmp_path / "missing.csv"))


# --- the papers' columns --------------------------------------------------------------------------
def test_the_papers_numbers_load_with_their_sources_and_flags():
    paper = load_paper_results()
    assert paper.claims and all(c.source for c in paper.claims)
    head = paper.headline("darts", "nb201", "cifar10")
    assert head.value == 54.30 and not head.unconfirmed and head.metric == "nb201_cifar10"
    v2 = paper.headline("darts_v2", "darts", "cifar10")
    assert (v2.value, v2.std, v2.unconfirmed) == (2.76, 0.09, False)
    assert paper.headline("pc_darts", "darts", "cifar10").text() == "2.57 ± 0.07 ⚠"     # only the ± is ⚠
    rf = [c for c in paper.for_group("rf_darts", "nb201", "cifar10") if c.metric == "nb201_cifar10"]
    assert {(c.stat, c.value, c.unconfirmed) for c in rf} == {("best", 94.36, False), ("mean", 94.27, True)}
    assert paper.headline("single_darts", "nb201", "cifar10").text() == "⚠ unknown"
    assert paper.headline("opp_darts", "nb201", "cifar10").text() == "not reported"
    # RobustDARTS' S1-S4 table: every number unconfirmed
    s2 = paper.headline("darts", "s2", "cifar10")
    assert s2.value == 4.85 and s2.unconfirmed and s2.text().endswith("⚠")


@pytest.mark.skipif(not METHODS_MD.exists(), reason="../shared/docs/methods.md absent")
def test_every_paper_number_is_in_methods_md_section_3():
    text = METHODS_MD.read_text(encoding="utf-8")
    section = text[text.index("## 3. Headline results"):text.index("## 4.")]
    for c in load_paper_results().claims:
        if c.value is None:
            continue
        forms = {f"{c.value:g}", f"{c.value:.2f}", f"{c.value:.1f}"}
        assert any(f in section for f in forms), (c.paper_method, c.metric, c.value)
        if c.std is not None:
            assert f"{c.std:.2f}" in section, (c.paper_method, c.metric, c.std)
    # and the other way: every number of the NB201 table is loaded, as a claim or a reference point
    nb201 = section[:section.index("DARTS space, CIFAR-10")]
    columns = ["nb201_cifar10_valid", "nb201_cifar10", "nb201_cifar100_valid", "nb201_cifar100",
               "nb201_imagenet16_valid", "nb201_imagenet16"]
    paper = load_paper_results()
    loaded = {(c.paper_method, c.metric, c.value, c.unconfirmed) for c in paper.claims if c.spaces == ("nb201",)}
    loaded |= {("optimum of the space", r.metric, r.value, r.unconfirmed) for r in paper.references}
    for line in nb201.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 8 or cells[0] not in ("optimum of the space", "DARTS-V1 (1st order)", "DARTS-V2 (2nd order)"):
            continue
        for metric, cell in zip(columns, cells[1:7]):
            value = float(cell.replace("*", "").split()[0])
            assert (cells[0], metric, value, "⚠" in cell) in loaded, (cells[0], metric, cell)


def test_claim_rows_put_ours_beside_the_paper_with_the_right_statistic(tmp_path):
    table = nb201_table(tmp_path / "nb201.csv")
    exps = [nb201_exp("rf_darts", 1, BEST), nb201_exp("rf_darts", 2, MIXED), nb201_exp("darts", 1, ALL_SKIP)]
    report = build_report(exps, tmp_path / "r", name="t", root=tmp_path, paper=load_paper_results(),
                          nb201_table=str(table))
    rows = {(r.group.method, r.claim.metric, r.claim.stat): r for r in report.claims}
    best = rows[("rf_darts", "nb201_cifar10", "best")]
    assert best.ours == pytest.approx(94.37) and best.delta == pytest.approx(94.37 - 94.36)
    assert best.ours_text == "94.37 (best of 2)"
    mean = rows[("rf_darts", "nb201_cifar10", "mean")]
    assert mean.ours == pytest.approx(92.185) and mean.claim.unconfirmed
    darts = rows[("darts", "nb201_cifar10", "mean")]
    assert darts.delta == pytest.approx(0.0) and darts.ours_text == "54.30 (n=1)"
    assert rows[("darts", "nb201_cifar10_valid", "mean")].ours is None        # not in the table
    claims = list(csv.DictReader(open(tmp_path / "r" / "claims.csv")))
    assert {"ours", "paper_value", "unconfirmed", "source", "delta"} <= set(claims[0])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "94.27 ⚠" in md and "94.36 (best run)" in md and "RF-DARTS paper, abstract" in md
    assert "94.37 (NB201 paper; confirmed" in md and "91.61 ⚠ unconfirmed (NB201 paper)" in md


def test_paper_results_are_checked_when_loaded(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("claims:\n  - {methods: [darts], paper_method: D, space: nb201, dataset: cifar10, "
                   "metric: accuracy, value: 1, source: x}\n")
    with pytest.raises(CompareError, match="unknown metric 'accuracy'"):
        load_paper_results(bad)
    bad.write_text("references:\n  - {space: nb201, metric: nb201_cifar10, what: optimum, source: x}\n")
    with pytest.raises(CompareError, match="reference 1: missing value"):
        load_paper_results(bad)
    claim = PaperClaim(("darts",), "D", ("darts",), ("cifar10",), "retrain_error", 3.0, "x", std=0.14,
                       std_unconfirmed=True)
    assert claim.text() == "3.00 ± 0.14 ⚠"


# --- the collapse sentence ------------------------------------------------------------------------
def s2_exp(method: str, seed: int, normal_op: str, pf_series: list[float]) -> Experiment:
    return experiment(method, seed, space="s2", genotype=darts_cell(normal_op, "skip_connect"),
                      series={"param_free_ops_normal": pf_series, "param_free_ops": pf_series},
                      alpha_history=s2_alpha_history([0.5, 0.7, 0.9]))


def test_collapse_sentence_says_darts_drifted_and_the_cures_did_not(tmp_path):
    exps = [s2_exp("darts", s, "skip_connect", [2.0, 5.0, 8.0]) for s in (1, 2, 3)]
    exps += [s2_exp("rf_darts", s, "sep_conv_3x3", [2.0, 1.0, 0.0]) for s in (1, 2, 3)]
    exps += [s2_exp("opp_darts", 1, "sep_conv_3x3", [0.0, 0.0, 0.0])]
    [verdict] = collapse_verdicts(group_experiments(exps))
    s = verdict.sentence
    assert s.startswith("On S2 / cifar10 (profile full): plain DARTS drifted to skip_connect")
    assert "darts: skip_connect share 1.00, dominates the cell in 3 of 3 seeds" in s
    assert "parameter-free ops 2.0 → 8.0" in s
    assert "The cures did not (rf_darts: skip_connect share 0.00, dominates the cell in 0 of 3 seeds" in s
    assert "opp_darts" in s
    report = build_report(exps, tmp_path / "r", name="s2", root=tmp_path, paper=load_paper_results())
    md = (tmp_path / "r" / "report.md").read_text()
    assert "plain DARTS drifted to skip_connect" in md
    assert "4.85 ⚠" in md                                      # RobustDARTS' S2 number, unconfirmed
    names = {p.name for p in report.figures}
    assert {"collapse_s2_cifar10_full.png", "collapse_normal_s2_cifar10_full.png",
            "alpha_darts_s2_cifar10_full.png", "alpha_rf_darts_s2_cifar10_full.png"} <= names
    for p in report.figures:
        png_ok(p)


@pytest.mark.parametrize("darts_op, cure_ops, expected", [
    ("sep_conv_3x3", ["sep_conv_3x3"], "plain DARTS did not drift to skip_connect"),
    ("sep_conv_3x3", ["sep_conv_3x3"], "and neither did the cures"),
    ("skip_connect", ["skip_connect"], "and so did the cures (rf_darts"),
    ("skip_connect", ["sep_conv_3x3", "skip_connect"], "Of the cures, these did not: rf_darts"),
    ("sep_conv_3x3", ["skip_connect"], "Cures that drifted to skip_connect: rf_darts"),
])
def test_collapse_sentence_states_whatever_the_numbers_show(darts_op, cure_ops, expected):
    exps = [s2_exp("darts", s, darts_op, [1.0, 2.0]) for s in (1, 2)]
    methods = ["rf_darts", "single_darts"]
    for method, op in zip(methods, cure_ops):
        exps += [s2_exp(method, s, op, [1.0, 2.0]) for s in (1, 2)]
    [verdict] = collapse_verdicts(group_experiments(exps))
    assert expected in verdict.sentence, verdict.sentence


def test_a_method_drifted_when_most_of_its_seeds_did():
    half_and_half = [s2_exp("darts", 1, "skip_connect", [1.0]), s2_exp("darts", 2, "sep_conv_3x3", [1.0])]
    [v] = collapse_verdicts(group_experiments(half_and_half))
    assert "did not drift" in v.sentence and "1 of 2 seeds" in v.sentence
    [v] = collapse_verdicts(group_experiments(half_and_half), threshold=0.0)       # every seed counts
    assert "plain DARTS drifted" in v.sentence


# --- the report on hand-made input ----------------------------------------------------------------
def test_report_folder_has_the_tables_and_figures(tmp_path):
    table = nb201_table(tmp_path / "nb201.csv")
    exps = [nb201_exp(m, s, arch, metrics={"search_seconds": 100.0 * s, "retrain_acc": 90.0 + s,
                                           "params_m": 1.0, "macs_m": 100.0, "search_memory_gb": 2.0 + s})
            for m, arch in (("darts", ALL_SKIP), ("single_darts", BEST)) for s in (1, 2)]
    for e in exps:
        e.alpha_history = [{"alphas": {"cell": [[0.2] * 5] * 6},
                            "op_names": {"cell": [["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3",
                                                   "avg_pool_3x3"]] * 6}}] * 3
    build_report(exps, tmp_path / "r", name="t", root=tmp_path, paper=load_paper_results(),
                 nb201_table=str(table))
    rows = list(csv.DictReader(open(tmp_path / "r" / "table.csv")))
    assert len(rows) == 4 and list(rows[0]) == list(EXPERIMENT_COLUMNS)
    assert {r["genotype"] for r in rows} == {ALL_SKIP, BEST}
    assert rows[0]["paper_value"] == "54.3" and rows[0]["paper_source"].startswith("NB201 paper")
    md = (tmp_path / "r" / "report.md").read_text()
    for heading in ("## Summary (mean ± std over seeds)", "## The papers' numbers beside ours", "## Collapse",
                    "## Derived cells, per seed", "## Figures"):
        assert heading in md
    assert "91.50 ± 0.71" in md                 # retrained accuracy over the two seeds
    summary = list(csv.DictReader(open(tmp_path / "r" / "summary.csv")))
    assert [float(r["search_memory_gb_mean"]) for r in summary] == [3.5, 3.5]     # GPU runs: their memory
    assert rows[0]["search_memory_gb"] in ("3.0", "4.0")
    assert "plain DARTS drifted to skip_connect" in md       # all-skip NB201 cells
    figures = sorted(p.name for p in (tmp_path / "r").glob("*.png"))
    assert figures == ["alpha_darts_nb201_cifar10_full.png", "alpha_single_darts_nb201_cifar10_full.png",
                       "collapse_nb201_cifar10_full.png", "nb201_cifar10.png", "nb201_cifar100.png",
                       "nb201_imagenet16.png"]
    for name in figures:
        png_ok(tmp_path / "r" / name)
    assert json.loads((tmp_path / "r" / "experiments.json").read_text())[0]["series"]["param_free_ops"]


def test_no_experiments_says_how_to_run_a_sweep_and_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("NASCORE_PROJECT_ROOT", str(tmp_path))
    with pytest.raises(CompareError) as err:
        compare(CompareOptions(name="t"), root=tmp_path)
    assert "no finished experiments found" in str(err.value)
    assert "dvc exp run --queue" in str(err.value) and "dvc queue start" in str(err.value)
    assert not (tmp_path / "mlflow.db").exists(), "reading must not create an MLflow store"
    with pytest.raises(CompareError, match="--name"):
        compare(CompareOptions(name="a/b"), root=tmp_path)


def test_cli_exits_2_with_the_message_when_nothing_matches(tmp_path, monkeypatch, capsys):
    from stages.compare import main
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("NASCORE_PROJECT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as code:
        main(["--name", "x", "--method", "pc_darts"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert "nascore compare: error: no finished experiments found (filters: method=pc_darts)" in err
    assert "dvc exp run --queue" in err


def test_cli_lists_take_commas_like_dvc_grids():
    from stages.compare import parse_args
    opts = parse_args(["--name", "x", "--method", "darts,rf_darts", "--method", "opp_darts", "--seed", "1,2",
                       "--from", "mlflow", "--nb201-table", "none"])
    assert opts.filters == Filters(methods=("darts", "rf_darts", "opp_darts"), seeds=(1, 2))
    assert opts.source == "mlflow" and opts.nb201_table == "none" and opts.name == "x"


# --- end to end: one smoke sweep through DVC's queue ----------------------------------------------
SWEEP_METHODS = ("darts", "rf_darts")
SWEEP_SEEDS = (1, 2)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from tests.e2e import make_repo
    repo = make_repo(tmp_path_factory.mktemp("compare") / "project")
    out = repo.dvc("exp", "run", "--queue", "-S", "profile=smoke", "-S", "space=nb201",
                   "-S", f"method={','.join(SWEEP_METHODS)}", "-S", f"seed={','.join(map(str, SWEEP_SEEDS))}")
    assert out.stdout.count("Queued experiment") == 4, out.stdout       # the -S grid: 2 x 2
    repo.dvc("queue", "start", "-j", "2")
    deadline = time.monotonic() + 1200
    while True:
        status = repo.dvc("queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, f"the queue did not finish:\n{status}"
        time.sleep(5)
    if status.count("Success") != 4:
        logs = "\n".join(repo.dvc("queue", "logs", line.split()[1], check=False).stdout[-3000:]
                         for line in status.splitlines() if "Failed" in line)
        pytest.fail(f"queued experiments failed:\n{status}\n{logs}")
    return repo


def compare_in(repo, name: str, *args: str, env_extra: dict | None = None, check: bool = True
               ) -> subprocess.CompletedProcess:
    """`python -m stages.compare --name NAME ...` in the temporary project, as a user runs it."""
    env = dict(repo.env, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "stages.compare", "--name", name, *args], cwd=repo.root,
                          env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def read_table(repo, name: str) -> list[dict]:
    return list(csv.DictReader(open(repo.root / "reports" / name / "table.csv")))


@pytest.fixture(scope="module")
def full_report(sweep):
    """The report from DVC + MLflow, built before any test takes a source away."""
    compare_in(sweep, "full")
    return read_table(sweep, "full")


@pytest.mark.slow
def test_the_queued_sweep_ran_four_distinct_experiments(sweep):
    show = json.loads(sweep.dvc("exp", "show", "--json").stdout)
    exps = [rev for base in show if base.get("experiments") for e in base["experiments"] for rev in e["revs"]]
    params = {(r["data"]["params"]["params.yaml"]["data"]["method"],
               r["data"]["params"]["params.yaml"]["data"]["seed"]) for r in exps}
    assert params == {(m, s) for m in SWEEP_METHODS for s in SWEEP_SEEDS}
    # no clash: one MLflow parent run per experiment, named after it, each with its own run key
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=sweep.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("nascore").experiment_id],
                              filter_string="tags.`nascore.role` = 'pipeline'")
    assert sorted(r.info.run_name for r in runs) == sorted(r["name"] for r in exps)
    assert len({r.data.tags["nascore.run_key"] for r in runs}) == 4
    assert not list((sweep.root / "scratch").glob("*/*")), "scratch checkpoints (keyed by params) removed"


@pytest.mark.slow
def test_report_from_the_sweep_has_a_row_per_experiment_and_real_figures(sweep, full_report):
    rows = full_report
    assert len(rows) == 4 and list(rows[0]) == list(EXPERIMENT_COLUMNS)
    assert {(r["method"], int(r["seed"])) for r in rows} == {(m, s) for m in SWEEP_METHODS for s in SWEEP_SEEDS}
    assert {r["source"] for r in rows} == {"dvc+mlflow"}
    for r in rows:
        NB201Genotype.from_arch_string(r["genotype"])                      # a real NB201 cell
        assert not HAVE_TABLE or 0 < float(r["nb201_cifar10"]) <= 94.38
        assert r["param_free_ops"] and r["search_seconds"] and r["params_m"] and r["macs_m"]
        assert r["retrain_acc"] and r["paper_metric"] == "nb201_cifar10" and r["paper_source"]
    folder = sweep.root / "reports" / "full"
    summary = list(csv.DictReader(open(folder / "summary.csv")))
    assert [s["method"] for s in summary] == list(SWEEP_METHODS) and {s["seeds"] for s in summary} == {"2"}
    md = (folder / "report.md").read_text()
    assert "Profile smoke" in md and "## Collapse" in md and "plain DARTS" in md
    assert "54.30" in md and "94.27 ⚠" in md                              # the papers beside ours
    figures = {p.name for p in folder.glob("*.png")}
    assert {"collapse_nb201_cifar10_smoke.png", "alpha_darts_nb201_cifar10_smoke.png",
            "alpha_rf_darts_nb201_cifar10_smoke.png"} <= figures
    assert not HAVE_TABLE or "nb201_cifar10.png" in figures       # each seed against the whole space
    for name in figures:
        png_ok(folder / name)
        assert f"]({name})" in md
    # ... and logged to MLflow as a "compare" run with the report
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=sweep.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("nascore").experiment_id],
                               filter_string="tags.`nascore.role` = 'compare'")
    assert run.info.run_name == "compare-full" and run.info.run_id in md
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "table.csv", "collapse_nb201_cifar10_smoke.png"} <= logged


@pytest.mark.slow
def test_report_rebuilt_from_dvc_alone_when_mlflow_is_unreachable(sweep, full_report):
    # port 9 (discard) on this machine: closed, refused at once; nothing else is contacted
    proc = compare_in(sweep, "dvc_only", env_extra={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    rows = read_table(sweep, "dvc_only")
    assert len(rows) == 4 and {r["source"] for r in rows} == {"dvc"}
    assert {r["mlflow_run_id"] for r in rows} == {""}
    key = lambda r: (r["method"], r["seed"], r["genotype"], r["nb201_cifar10"], r["param_free_ops"])
    assert sorted(map(key, rows)) == sorted(map(key, full_report))
    md = (sweep.root / "reports" / "dvc_only" / "report.md").read_text()
    assert "Rebuilt from DVC alone (MLflow unavailable)" in md and "127.0.0.1:9" in md
    assert "not logged to MLflow" in md and "Rebuilt from DVC alone" in proc.stderr
    png_ok(sweep.root / "reports" / "dvc_only" / "collapse_nb201_cifar10_smoke.png")


@pytest.mark.slow
def test_report_rebuilt_from_mlflow_alone_after_the_exp_refs_are_removed(sweep, full_report):
    # Last in this module: it removes the sweep's DVC experiments.
    sweep.dvc("exp", "remove", "--all")
    show = json.loads(sweep.dvc("exp", "show", "--json").stdout)
    assert not any(base.get("experiments") for base in show), "the exp refs are gone"
    proc = compare_in(sweep, "mlflow_only")
    rows = read_table(sweep, "mlflow_only")
    assert len(rows) == 4 and {r["source"] for r in rows} == {"mlflow"} and {r["rev"] for r in rows} == {""}
    key = lambda r: (r["method"], r["seed"], r["genotype"], r["param_free_ops"], r["search_seconds"],
                     r["retrain_acc"], r["params_m"])
    assert sorted(map(key, rows)) == sorted(map(key, full_report))
    for a, b in zip(sorted(rows, key=key), sorted(full_report, key=key)):
        if HAVE_TABLE:
            assert float(a["nb201_cifar10"]) == pytest.approx(float(b["nb201_cifar10"]))
    folder = sweep.root / "reports" / "mlflow_only"
    md = (folder / "report.md").read_text()
    assert "Rebuilt from the MLflow store alone" in md and "Rebuilt from the MLflow store alone" in proc.stderr
    # the collapse curve comes from the search runs' metric history; α from derive's own figures
    png_ok(folder / "collapse_nb201_cifar10_smoke.png")
    per_seed = sorted(p.name for p in folder.glob("alpha_*_seed*.png"))
    assert len(per_seed) == 4, per_seed
    for name in per_seed:
        png_ok(folder / name)
