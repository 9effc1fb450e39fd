"""bench/search_step.py runs end to end at tiny sizes and prints its tables (so it cannot rot)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nascore.train import NonFiniteLossError

BENCH = Path(__file__).resolve().parent.parent / "bench" / "search_step.py"


def test_the_bench_runs_at_tiny_sizes_and_prints_the_ratio_table(tmp_path):
    # in its own process, as users start it: the live-bytes count takes in every tensor alive in
    # the process, and other tests' leftovers (torch.compile's caches) would skew these tiny figures
    run = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--size", "tiny", "--cases", "nb201,nb201_valid",
         "--steps", "1", "--warmup", "1", "--retrain-variants", "nascore,nascore+fused", "--profile", "--by-op", "--by-site",
         "--threads", "1", "--json", str(tmp_path / "figures.json")],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    bench = load_bench()
    assert "ratio base / variant" in out
    for row in ("nb201          eager", "nb201          fused", "retrain        nascore", "retrain        nascore+fused"):
        assert row in out
    assert "nascore+fused_dense" not in out
    figures = json.loads((tmp_path / "figures.json").read_text())["figures"]
    by = {(f["case"], f["variant"]): f for f in figures}
    # what the CPU run can vouch for: fewer kernels than the reference, no host sync in a step
    assert by["nb201", "fused"]["writing_ops"] < by["nb201", "eager"]["writing_ops"] < \
        by["nb201", "reference"]["writing_ops"]
    assert 0 < by["nb201", "fused"]["mb_read"] < by["nb201", "reference"]["mb_read"]
    # the same network through the same ops holds the same tensors (at this size the fused
    # variants' gathered weights outweigh the activations they save, so no order is asserted)
    assert by["nb201", "fused"]["live_mb"] > 0
    assert by["nb201", "eager"]["live_mb"] == pytest.approx(by["nb201", "reference"]["live_mb"], rel=0.1)
    assert by["retrain", "nascore+fused"]["live_mb"] > 0
    assert by["nb201", "reference"]["syncs"] > 0
    assert by["nb201", "eager"]["syncs"] == by["nb201", "fused"]["syncs"] == 0
    # the validation pass: the fused cells in eval mode too
    assert by["nb201_valid", "fused"]["writing_ops"] < by["nb201_valid", "eager"]["writing_ops"] / 2
    # --profile: where a step's time goes, per aten op on the CPU, largest first
    profile = by["nb201", "fused"]["profile"]
    names = [name for name, _, _ in profile["top"]]
    assert "aten::convolution_backward" in names and all(n.startswith("aten::") for n in names)
    times = [ms for _, ms, _ in profile["top"]]
    assert times == sorted(times, reverse=True) and 0 < sum(times) <= profile["total_ms"] + 1e-6
    assert "profile nb201 fused:" in out and by["retrain", "reference"]["profile"]["top"]
    # a retrain variant's profile is per step (a run of 1 + steps steps less a run of 1): the eager
    # network's step calls its convs' backward as often as the reference's one step does
    # (from every name's calls, not the top by time: on a loaded CPU a name's time difference can be 0)
    calls = {v: by["retrain", v]["profile"]["calls"] for v in ("reference", "nascore")}
    assert calls["nascore"]["aten::convolution_backward"] == calls["reference"]["aten::convolution_backward"] > 0
    assert "profile retrain nascore+fused:" in out
    # --by-op: the counted writing ops by aten op, the most frequent first, in the JSON and printed
    for key in (("nb201", "fused"), ("retrain", "nascore")):
        rows = by[key]["by_op"]
        calls = [n for _, n, _ in rows]
        assert calls == sorted(calls, reverse=True) and sum(calls) <= by[key]["writing_ops"]
        assert dict((name, n) for name, n, _ in rows)["convolution"] > 0
    assert "writing ops of nb201 fused by aten op" in out
    # the retrain step is timed and counted as the recipe runs it after its first epoch: with
    # drop-path masks (one per droppable op in the eager cells; one per cell in the fused ones)
    for variant in ("reference", "nascore", "nascore+fused"):
        assert sum(n for name, n, _ in by["retrain", variant]["by_op"] if name.startswith("bernoulli")) > 0, variant
    # --by-site: where the writing ops come from, a forward's line or a backward's autograd node
    sites = {(name, site): n for name, site, n in by["nb201", "fused"]["by_site"]}
    assert sites[("convolution_backward", "backward of ConvolutionBackward0")] > 0
    assert any(name == "convolution" and site.startswith("nascore/fused.py:") for name, site in sites)
    assert any(site.startswith("bench/reference.py:") for _, site, _ in by["nb201", "reference"]["by_site"])
    # a retrain variant's sites per step (`train`'s runs of two lengths, differenced): the fused
    # cells' convs come from nascore/fused.py, the eager cells' not
    retrain_sites = {v: {(name, site.split(":")[0]) for name, site, _ in by["retrain", v]["by_site"]}
                     for v in ("nascore", "nascore+fused")}
    assert ("convolution", "nascore/fused.py") in retrain_sites["nascore+fused"]
    assert ("convolution", "nascore/fused.py") not in retrain_sites["nascore"]
    assert ("convolution_backward", "backward of ConvolutionBackward0") in retrain_sites["nascore"]
    assert by["retrain", "reference"]["by_site"] is None
    assert "writing ops of nb201 fused by site" in out
    # the retrain's test pass, 4 batches a step (of 16 at the tiny size, of 256 at the others): the fused evaluation cells write fewer
    # ops than the eager ones; DARTS' `infer` reads every batch's figures on the host, `evaluate` none
    assert {v for c, v in by if c == "retrain_eval"} == {"reference", "nascore", "nascore+fused"}
    assert by["retrain_eval", "nascore"]["batch"] == 4 * bench.SIZES["tiny"].eval_batch == 4 * 16
    assert bench.SIZES["full"].eval_batch == bench.SIZES["small"].eval_batch == 256
    assert by["retrain_eval", "nascore+fused"]["writing_ops"] < by["retrain_eval", "nascore"]["writing_ops"]
    assert by["retrain_eval", "reference"]["syncs"] >= 4 > by["retrain_eval", "nascore"]["syncs"]
    assert "retrain, 600 CIFAR-10 epochs at these figures" in out
    # a retrain step is timed apart from what each epoch adds once (`steady_epoch`)
    assert by["retrain", "nascore"]["epoch_overhead_ms"] >= 0 and by["retrain", "nascore"]["ms_per_step"] > 0
    assert by["retrain", "reference"]["epoch_overhead_ms"] is None
    # NCHW variants all: no activation written channels_last
    assert all(f["off_layout"] == 0 for f in figures if f["writing_ops"] is not None)
    # the profiler's kernel count (what a compiled variant has) agrees with the dispatch count
    # over uncompiled code: every counted figure, a retrain's per-step difference of runs included
    counted = [f for f in figures if f["writing_ops"] is not None]
    assert counted and all(f["kernels"] is not None for f in counted)
    for f in counted:
        assert abs(f["kernels"] - f["writing_ops"]) <= max(2, 0.02 * f["writing_ops"]), (f["case"], f["variant"])
    assert " kernels " in out.splitlines()[next(i for i, line in enumerate(out.splitlines()) if "writing" in line)]


def load_bench():
    """bench/search_step.py as a module."""
    spec = importlib.util.spec_from_file_location("search_step", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["search_step"] = bench
    spec.loader.exec_module(bench)
    return bench


def test_bench_variants_name_a_backend_and_modifiers():
    bench = load_bench()
    assert bench.speed_options("eager") == {}
    assert bench.speed_options("fused_dense+graph+bf16") == {
        "backend": "fused_dense", "cuda_graph": True, "amp": "bf16", "channels_last": True}
    # bf16's two halves on their own: autocast in NCHW, channels_last in fp32
    assert bench.speed_options("fused+graph+amp") == {"backend": "fused", "cuda_graph": True, "amp": "bf16"}
    assert bench.speed_options("eager+cl") == {"channels_last": True}
    for bad in ("fused+grpah", "dense", "fused+"):
        with pytest.raises(ValueError, match="unknown variant"):
            bench.speed_options(bad)
    # a dispatch-mode counter sees the eager ops of a compiled variant: its counts are withheld
    # the search's validation runs in the steps' backend, precision and layout, outside any graph:
    # a graph variant's validation is its graph-less twin's, measured once
    assert bench.validation_twin("fused_dense+graph+bf16") == "fused_dense+bf16"
    assert bench.validation_twin("fused+compile") == "fused+compile" and bench.validation_twin("reference") == "reference"
    assert bench.runs_to_measure(["nb201", "nb201_valid"], ["fused+bf16", "fused+graph+bf16", "fused+graph"]) == [
        ("nb201", "fused+bf16"), ("nb201", "fused+graph+bf16"), ("nb201", "fused+graph"),
        ("nb201_valid", "fused+bf16"), ("nb201_valid", "fused+graph")]
    assert bench.countable("reference") and bench.countable("fused_dense+graph+bf16")
    # a replayed CUDA graph dispatches nothing to count
    assert not bench.countable("fused+graph", "cuda") and bench.countable("fused+bf16", "cuda")
    assert not bench.countable("fused+compile") and not bench.countable("eager+graph+compile")
    # cell by cell (`search.compile_scope`'s default) or as one network
    assert bench.speed_options("fused+compile") == {"backend": "fused", "compile": True}
    assert bench.speed_options("fused+compilenet") == {"backend": "fused", "compile": True, "compile_scope": "network"}
    assert not bench.countable("fused+compilenet")
    # the retrain's variants by the same rule (`train` compiles with retrain.train.compile)
    assert not bench.countable(bench.retrain_speed("nascore+fused_dense+graph+compile"))
    assert bench.countable(bench.retrain_speed("nascore+fused_dense+graph"))
    with pytest.raises(SystemExit):              # refused before any variant is measured
        bench.main(["--device", "cpu", "--size", "tiny", "--variants", "fused,fused+grpah"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--size", "tiny", "--cases", "nb201,darts_frist"])
    for bad in ("fused", "nascore+fused+amps"):
        with pytest.raises(SystemExit):
            bench.main(["--device", "cpu", "--size", "tiny", "--retrain-variants", f"nascore,{bad}"])
    for switch in ("unmerged", "dp", "matmul"):         # search cells' switches, not the retrain's
        with pytest.raises(SystemExit):
            bench.main(["--device", "cpu", "--size", "tiny", "--retrain-variants", f"nascore+fused_dense+{switch}"])
    assert bench.speed_options("fused_dense+grouped+unmerged+chained+kindbn") == {
        "backend": "fused_dense", "block_diagonal": False, "merge_kernel_sizes": False, "matmul_mix": False,
        "merge_batch_norms": False}
    # a compiled search sums its nodes by chained adds (`SearchConfig.mixes_by_matmul`): `+matmul` keeps the product
    assert bench.speed_options("fused+compile+matmul") == {"backend": "fused", "compile": True, "matmul_mix": True}
    assert bench.retrain_speed("nascore+graph") == "eager+graph"
    # 600 epochs: 520 steps of 96 and a test pass over 10,000 images each; a graphed variant's
    # test pass is its own (`train` runs the test passes through a graph too), not its
    # ungraphed sibling's
    figures = [bench.Figure("retrain", "nascore+fused+graph", 96, 48.3, 96 / 0.0483),
               bench.Figure("retrain_eval", "nascore+fused", 1024, 80.0, 12_800.0),
               bench.Figure("retrain_eval", "nascore+fused+graph", 1024, 40.0, 25_600.0),
               bench.Figure("retrain", "reference", 96, 142.4, 96 / 0.1424)]
    (v1, train_h, test_h, _), (v2, ref_train_h, ref_test_h, _) = bench.retrain_estimate(figures)
    assert (v1, v2) == ("nascore+fused+graph", "reference")
    assert train_h == pytest.approx(600 * 520 * 48.3 / 3.6e6) and test_h == pytest.approx(600 * 10_000 / 25_600 / 3600)
    assert ref_train_h == pytest.approx(600 * 520 * 142.4 / 3.6e6) and math.isnan(ref_test_h)   # no figure: unknown
    assert bench.retrain_speed("nascore+fused_dense+graph+amp") == "fused_dense+graph+amp"
    # an epoch's overhead (a graph's warm-up and capture) is paid once per epoch, not per step
    figures[0].epoch_overhead_ms = 400.0
    (_, with_overhead, _, _), _ = bench.retrain_estimate(figures)
    assert with_overhead == pytest.approx(600 * (520 * 48.3 + 400.0) / 3.6e6)


def test_a_search_estimate_adds_each_epochs_validation_of_its_supernet():
    bench = load_bench()
    figures = [bench.Figure("nb201", "fused_dense+graph+bf16", 64, 25.7, 64 / 0.0257),
               bench.Figure("nb201_valid", "fused_dense+bf16", 512, 20.0, 512 / 0.020),
               bench.Figure("darts_second", "fused_dense+graph+bf16", 64, 239.3, 64 / 0.2393),
               bench.Figure("darts_valid", "fused_dense+graph+bf16", 512, 80.0, 512 / 0.080),
               bench.Figure("pc_darts", "reference", 256, 1264.9, 256 / 1.2649)]
    (c1, v1, steps1, valid1, once1), (c2, _, steps2, valid2, _), (c3, _, _, valid3, _) = bench.search_estimate(figures)
    assert once1 == 0.0                 # no warm-up measured: nothing paid once
    # 390 steps of 64 and 25,000 validation images an epoch; the graph variant validates as its twin
    assert (c1, v1) == ("nb201", "fused_dense+graph+bf16")
    assert steps1 == pytest.approx(50 * 390 * 25.7 / 6e4) and valid1 == pytest.approx(50 * 25_000 * 0.020 / 512 / 60)
    # second order validates DARTS' supernet
    assert c2 == "darts_second" and steps2 == pytest.approx(50 * 390 * 239.3 / 6e4)
    assert valid2 == pytest.approx(50 * 25_000 * 0.080 / 512 / 60)
    assert c3 == "pc_darts" and math.isnan(valid3)       # no pc_darts_valid figure: unknown


def test_a_search_estimate_adds_what_the_run_pays_once_its_compile():
    """A compiled search pays its compile once, in its first steps: the estimate adds the step's
    and its validation's warm-up beyond that many steady steps (50 epochs of steps alone would
    hide a compile of minutes against the issue's 5- and 20-minute targets)."""
    bench = load_bench()
    figures = [bench.Figure("nb201", "fused_dense+bf16+compile", 64, 20.0, 64 / 0.020, warmup_s=300.06,
                            warmup_steps=3),
               bench.Figure("nb201_valid", "fused_dense+bf16+compile", 512, 10.0, 512 / 0.010, warmup_s=60.03,
                            warmup_steps=3),
               bench.Figure("nb201", "fused_dense+bf16", 64, 30.0, 64 / 0.030, warmup_s=0.05, warmup_steps=3)]
    (_, _, steps, valid, once), (_, _, _, _, once_plain) = bench.search_estimate(figures)
    assert once == pytest.approx((300.0 + 60.0) / 60)
    assert steps == pytest.approx(50 * 390 * 20.0 / 6e4) and valid == pytest.approx(50 * 25_000 * 0.010 / 512 / 60)
    assert once_plain == 0.0            # a warm-up quicker than its steady steps: noise, not paid once
    # a retrain: its warm-up epochs and its test pass's warm-up
    retrain = [bench.Figure("retrain", "nascore+compile", 96, 40.0, 96 / 0.040, warmup_s=200.2, warmup_steps=5),
               bench.Figure("retrain_eval", "nascore+compile", 1024, 50.0, 1024 / 0.050, warmup_s=100.1,
                            warmup_steps=2)]
    (_, _, _, once_h), = bench.retrain_estimate(retrain)
    assert once_h == pytest.approx((200.0 + 100.0) / 3600)


def test_the_device_data_path_is_measured_and_added_to_the_estimates(tmp_path):
    bench = load_bench()
    out = tmp_path / "figures.json"
    bench.main(["--device", "cpu", "--size", "tiny", "--cases", "data", "--no-retrain", "--steps", "1",
                "--warmup", "1", "--json", str(out)])
    figures = {(f["case"], f["variant"]): f for f in json.loads(out.read_text())["figures"]}
    retrain, search = figures["data", "retrain"], figures["data", "search"]
    size = bench.SIZES["tiny"]
    assert (retrain["batch"], search["batch"]) == (size.retrain_batch, size.batch)
    # counted like a step: a handful of kernels a batch (the composed recipe took 37 with cutout,
    # 18 without), cutout's more, no host read
    assert 0 < search["writing_ops"] < retrain["writing_ops"] <= 12 and retrain["syncs"] == search["syncs"] == 0
    # a real run's step takes its batch(es) from this path: the estimates add them, where batches match
    step = bench.Figure("retrain", "nascore", size.retrain_batch, 40.0, 1.0)
    data = [bench.Figure(**f) for f in figures.values()]
    (_, with_data, _, _), = bench.retrain_estimate([step, *data])
    (_, without, _, _), = bench.retrain_estimate([step])
    assert with_data == pytest.approx(without * (40.0 + retrain["ms_per_step"]) / 40.0)
    nb201, pc = bench.Figure("nb201", "eager", size.batch, 30.0, 1.0), bench.Figure("pc_darts", "eager", 256, 30.0, 1.0)
    (_, _, nb201_min, _, _), (_, _, pc_min, _, _) = bench.search_estimate([nb201, pc, *data])
    (_, _, nb201_alone, _, _), (_, _, pc_alone, _, _) = bench.search_estimate([nb201, pc])
    assert nb201_min == pytest.approx(nb201_alone * (30.0 + 2 * search["ms_per_step"]) / 30.0)   # w's and α's batch
    assert pc_min == pc_alone                                # measured at another batch: left out


def test_a_retrain_step_is_timed_apart_from_what_each_epoch_adds_once():
    # epochs of 5 and 55 steps at 40 ms a step, each with 450 ms of warm-up and capture: the
    # bench's old figure, the 55-step epoch's mean, was 48.2 ms; the run's 520-step epochs see 40.9
    bench = load_bench()
    ms, overhead = bench.steady_epoch(5 * 0.040 + 0.450, 5, 55 * 0.040 + 0.450, 55)
    assert ms == pytest.approx(40.0) and overhead == pytest.approx(450.0)
    # noise can put the shorter epoch's steps above the difference's: no negative overhead
    assert bench.steady_epoch(0.1, 5, 2.0, 55) == (pytest.approx(38.0), 0.0)
    # noise larger than the extra steps: the longer epoch's mean, its overhead in it
    assert bench.steady_epoch(1.0, 5, 0.9, 10) == (pytest.approx(90.0), 0.0)
    with pytest.raises(ValueError, match="more steps"):
        bench.steady_epoch(1.0, 5, 2.0, 5)


def test_a_failing_retrain_variant_costs_no_other_figure(tmp_path):
    bench = load_bench()
    out = tmp_path / "figures.json"
    # a CUDA graph needs a GPU: on the CPU `train` refuses it, and the variants after it still run
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--device", "cpu", "--size", "tiny", "--cases", "", "--steps", "1", "--warmup", "1",
                    "--no-count", "--retrain-variants", "nascore+graph,nascore+fused", "--json", str(out)])
    assert exit_.value.code == 1
    saved = json.loads(out.read_text())
    measured = {(f["case"], f["variant"]) for f in saved["figures"]}
    assert measured == {("retrain", "reference"), ("retrain_eval", "reference"),
                        ("retrain", "nascore+fused"), ("retrain_eval", "nascore+fused")}
    assert [f.split(":")[0] for f in saved["failures"]] == ["retrain nascore+graph", "retrain_eval nascore+graph"]
    assert all("needs a CUDA device" in f for f in saved["failures"])


def test_on_the_cpu_the_bench_skips_the_bf16_refusal_but_keeps_the_probe(tmp_path, monkeypatch):
    """Where the probe fails, the bench still counts a channels_last bf16 search step (nascore
    refuses it in a real run: the counts are right, the gradients not), and leaves the probe
    alone: it also keeps inductor's layout choice off those convs in a compiled NCHW bf16 run
    (`graphs.inductor_options`), which the bench's compiled retrain needs to finish."""
    import nascore.search
    import nascore.train
    from nascore import graphs
    from nascore.supernet import Supernet
    bench = load_bench()
    monkeypatch.setattr(graphs, "cpu_bf16_dilated_grads_ok", lambda *args: False)
    compiled_with = []           # the compile's options, not the compile (minutes for a supernet here)
    monkeypatch.setattr(Supernet, "compile", lambda self, scope="cells", **kwargs: compiled_with.append(kwargs))
    out = tmp_path / "figures.json"
    bench.main(["--device", "cpu", "--size", "tiny", "--cases", "darts_first", "--variants",
                "fused_dense+bf16,fused_dense+amp+compile", "--steps", "1", "--warmup", "0", "--no-count",
                "--no-retrain", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["failures"] == []
    assert {f["variant"] for f in saved["figures"]} == {"fused_dense+bf16", "fused_dense+amp+compile"}
    assert compiled_with and all(kw == {"options": {"layout_optimization": False}} for kw in compiled_with)
    # the refusal is back for in-process callers
    assert nascore.search.bf16_layout_problem is graphs.bf16_layout_problem
    assert nascore.train.bf16_layout_problem is graphs.bf16_layout_problem


def test_check_validates_a_run_without_measuring_it(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit) as ok:
        bench.main(["--check", "--device", "cuda", "--cases", "nb201,nb201_valid",
                    "--variants", "reference,fused_dense+graph+bf16", "--retrain-variants", "nascore+fused_dense+graph"])
    assert ok.value.code == 0
    out = capsys.readouterr().out
    # the validation case runs a graph variant's validation too (bf16, channels_last, no graph)
    assert ("check: 5 to measure: nb201 reference, nb201 fused_dense+graph+bf16, nb201_valid reference, "
            "nb201_valid fused_dense+graph+bf16, retrain nascore+fused_dense+graph") in out
    # the reference has no random-features search: left out, and said so, the ratios then to eager
    with pytest.raises(SystemExit) as ok:
        bench.main(["--check", "--cases", "rf_darts,darts_first", "--variants", "reference,fused", "--no-retrain"])
    assert ok.value.code == 0
    out = capsys.readouterr().out
    assert "# no reference for rf_darts (bench/reference.py has darts@darts, darts@nb201, " in out
    assert "check: 3 to measure: rf_darts fused, darts_first reference, darts_first fused" in out
    # a refused combination is refused at once, with the pipeline's reason
    with pytest.raises(SystemExit) as refused:
        bench.main(["--check", "--cases", "pc_darts", "--variants", "fused+dp+chained", "--no-retrain"])
    assert refused.value.code == 1
    assert "check: REFUSED pc_darts fused+dp+chained: params.yaml: search.drop_path > 0 on a fused backend needs" in capsys.readouterr().out


def test_any_method_on_any_space_is_a_case_with_the_pipelines_params():
    """Issue 4 asks for figures per method × space: `METHOD@SPACE` is that search's step, its
    params resolved as `dvc repro` resolves them; `matrix` is every pair the pipeline takes."""
    from nascore import config as C
    from nascore.methods import METHODS
    from nascore.spaces import SPACES
    bench = load_bench()
    full = bench.SIZES["full"]
    # a named case is a method × space: the same settings under either name
    assert bench.search_settings("pc_darts", full) == bench.search_settings("pc_darts@darts", full)
    assert bench.search_settings("nb201", full) == bench.search_settings("darts@nb201", full)
    space, cfg, batch = bench.search_settings("single_darts@s3", full, backend="fused_dense")
    expected = C.resolve_stage("search", {"method": "single_darts", "space": "s3", "dataset": "cifar10", "search": {
        "init_channels": 16, "layers": 8, "arch_warmup_epochs": 0, "backend": "fused_dense"}}).search
    assert (space, cfg, batch) == ("s3", expected, 64) and cfg.optimisation == "single_level"
    assert bench.search_settings("nb201_valid", full)[2] == 512          # the validation batch
    for bad in ("darts@s9", "dart@s1", "darts_s1"):
        with pytest.raises(ValueError, match="METHOD@SPACE"):
            bench.case_of(bad)
    cases, refused = bench.matrix_cases(bench.SIZES["tiny"])
    assert len(cases) + len(refused) == len(METHODS.names()) * len(SPACES.names())
    assert [r.split(":")[0] for r in refused] == ["opp_darts@s1"] and "per-edge lists" in refused[0]
    assert bench.has_reference("darts@nb201") and not bench.has_reference("single_darts@s3")


def test_a_case_without_a_reference_is_measured_against_eager(tmp_path, capsys):
    bench = load_bench()
    bench.main(["--device", "cpu", "--size", "tiny", "--cases", "single_darts@s3,darts@s3,darts@darts",
                "--variants", "reference,eager,fused_dense", "--no-retrain", "--steps", "1", "--warmup", "1",
                "--json", str(tmp_path / "f.json")])
    out = capsys.readouterr().out
    figures = json.loads((tmp_path / "f.json").read_text())["figures"]
    by = {(f["case"], f["variant"]): f for f in figures}
    assert set(by) == {(c, v) for c in ("single_darts@s3", "darts@s3") for v in ("eager", "fused_dense")} | {
        ("darts@darts", v) for v in ("reference", "eager", "fused_dense")}
    assert "# no reference for single_darts@s3, darts@s3 (" in out
    rows = out[out.index("ratio base / variant"):].splitlines()
    assert any(r.split()[:3] == ["single_darts@s3", "fused_dense", "eager"] for r in rows)
    assert any(r.split()[:3] == ["darts@darts", "fused_dense", "reference"] for r in rows)
    # the single-level step is one forward and backward, first order's two
    single, first = by["single_darts@s3", "eager"]["writing_ops"], by["darts@s3", "eager"]["writing_ops"]
    assert 0.4 < single / first < 0.7
    assert by["single_darts@s3", "fused_dense"]["writing_ops"] < single


@pytest.mark.parametrize("call, commands", [("lease", 5), ("bench", 1), ("profile", 1), ("compile", 2), ("dtype", 1),
                                            ("matrix", 1)])
def test_every_bench_command_of_a_gpu_call_is_valid(call, commands, tmp_path):
    # a lent GPU has 15 minutes in all: a typo in bench/gpu.sh must fail here, not there
    env = {**os.environ, "CHECK": "1", "OUT": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(BENCH.parent / "gpu.sh"), call], capture_output=True, text=True,
                         env=env, timeout=600)
    out = run.stdout + run.stderr
    assert "REFUSED" not in out and "error:" not in out and "Traceback" not in out, out[-3000:]
    checked = [line for line in out.splitlines() if line.startswith("check: ") and " to measure: " in line]
    assert len(checked) == commands, out[-3000:]
    assert all(not line.startswith("check: 0 ") for line in checked)


def test_the_kernel_bench_times_every_way_and_its_conv_ways_compute_one_function(tmp_path, monkeypatch):
    import torch
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("kernels", BENCH.parent / "kernels.py")
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = kernels           # its dataclass looks its module up there
    spec.loader.exec_module(kernels)
    # the block-diagonal weight (`nascore.fused.block_diagonal`) is the grouped conv's, spread:
    # the same output, on any groups count, stride and dilation, in either memory format
    shape = kernels.ConvShape("t", 2, 6, 9, 8, 3, 2, 2, 3)
    for dtype in ("fp32", "fp32+cl"):
        outs = [kernels.conv_case(shape, way, dtype, torch.device("cpu"))[1]() for way in kernels.CONV_WAYS]
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)
    # the node sums: `fused.mix` (one block or two) and the chained adds give one sum, paired or
    # not, in either layout
    for shape in (kernels.MixShape("t", 2, 3, 4, 2, 4, 3, 2), kernels.MixShape("t", 2, 3, 4, 1, 3, 2, 1)):
        for dtype in ("fp32", "fp32+cl"):
            outs = [kernels.mix_case(shape, way, dtype, torch.device("cpu"))[1]() for way in kernels.MIX_WAYS]
            for out in outs[1:]:
                torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)
            assert outs[0].shape == (2, shape.targets, 3, 4, 4)
    # a CPU run of the whole script at tiny shapes: every case and way, in the JSON
    monkeypatch.setattr(kernels, "BN_SHAPES", [("t", (2, 4, 4, 4))])
    monkeypatch.setattr(kernels, "CONV_SHAPES", [kernels.ConvShape("t", 2, 4, 8, 8, 3, 2, 2, 2)])
    monkeypatch.setattr(kernels, "MIX_SHAPES", [kernels.MixShape("t", 2, 3, 4, 2, 4, 3, 2)])
    kernels.main(["--device", "cpu", "--iters", "1", "--json", str(tmp_path / "k.json")])
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert {r["way"] for r in rows if r["part"] == "bn"} == set(kernels.BN_WAYS)
    assert len([r for r in rows if r["part"] == "conv"]) == len(kernels.CONV_WAYS) * len(kernels.CONV_DTYPES)
    assert len([r for r in rows if r["part"] == "mix"]) == len(kernels.MIX_WAYS) * len(kernels.MIX_DTYPES)
    assert all(r["us"] > 0 for r in rows)


def test_agreement_finds_the_fused_path_equal_to_eager_and_bf16_off_by_rounding(capsys):
    import re
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("agreement", BENCH.parent / "agreement.py")
    agreement = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agreement)
    agreement.main(["--device", "cpu", "--size", "tiny", "--case", "darts_first", "--variants",
                    "eager,fused,fused_dense,eager+amp", "--steps", "2", "--batches", "2"])
    out = capsys.readouterr().out

    def weight_diff(variant: str) -> float:
        line = next(x for x in out.splitlines() if x.startswith(variant + " "))
        return float(re.search(r"after 1 step: w (\S+)", line).group(1))
    assert weight_diff("fused") < 1e-5                 # the same function, summed in another order
    assert weight_diff("fused_dense") < 1e-5
    # bf16 rounds: visibly, but not wildly (NCHW: this torch's CPU bf16 channels_last dilated
    # convs are refused, `graphs.bf16_layout_problem`)
    assert 1e-4 < weight_diff("eager+amp") < 1e-1


def test_the_op_counter_counts_what_each_kernel_writes_and_reads():
    sys.path.insert(0, str(BENCH.parent))
    import torch
    from opcount import CountOps

    a, b, idx = torch.randn(4, 8), torch.randn(8), torch.tensor([1, 2])

    def counted(f):
        with CountOps() as c:
            f()
        return c.count.writing_ops, c.count.bytes_written, c.count.bytes_read
    f32 = 4
    assert counted(lambda: a + b) == (1, 32 * f32, (32 + 8) * f32)      # b broadcast: read once
    assert counted(lambda: a.view(32).t()) == (0, 0, 0)                  # views launch nothing
    c = a.clone()
    assert counted(lambda: c.add_(b)) == (1, 32 * f32, (32 + 8) * f32)   # in place: self is read too
    assert counted(lambda: c.copy_(a)) == (1, 32 * f32, 32 * f32)        # ... but not overwritten
    assert counted(lambda: b.expand(4, 8).sum()) == (1, f32, 8 * f32)
    assert counted(lambda: a.new_zeros(3)) == (1, 3 * f32, 0)            # `a` for its dtype only
    # a gather reads the rows it fetches and its index, not the whole source
    assert counted(lambda: a.index_select(0, idx)) == (1, 16 * f32, 16 * f32 + 2 * 8)

    # ... and per aten op: which kernels a step is made of, the most frequent first
    with CountOps() as k:
        (a + b).relu().add_(b)
        a + b
    assert k.count.largest() == [("add", 2, 2 * (32 + 32 + 8) * f32 / 2**20),
                                 ("relu", 1, 2 * 32 * f32 / 2**20), ("add_", 1, (32 + 32 + 8) * f32 / 2**20)]
    assert sum(n for _, n, _ in k.count.largest()) == k.count.writing_ops


def _tiny_conv_step(x, w):
    y = torch.nn.functional.conv2d(x.relu(), w)
    z = torch.nn.functional.batch_norm(y, None, None, training=True)
    return (z.relu() * 2 + 1).sum()


def test_the_kernel_counter_counts_what_compiled_code_launches():
    """`CountKernels`: over eager code the dispatch count's writing ops, op by op; over code
    torch.compile'd with inductor (which a dispatch mode cannot count: it makes the eager ops run),
    the C++ kernels inductor generated and the aten ops the compiled code calls, without the
    compile's own tracing."""
    sys.path.insert(0, str(BENCH.parent))
    from opcount import CountKernels, CountOps, computes

    # views, allocations and metadata launch nothing; in-place and foreach ops do
    assert not computes("view") and not computes("empty_strided") and not computes("_unsafe_view")
    assert computes("add_") and computes("_foreach_add_") and computes("convolution")
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)

    def step(f):
        x.grad = w.grad = None
        f(x, w).backward()
    step(_tiny_conv_step)
    with CountOps() as ops:
        step(_tiny_conv_step)
    with CountKernels() as eager:
        step(_tiny_conv_step)
    assert eager.count.kernels == ops.count.writing_ops == 13
    assert dict(eager.count.by_name) == dict(ops.count.writing_by_op)
    if not any(map(__import__("shutil").which, ("g++", "c++", "clang++"))):
        pytest.skip("inductor needs a C++ compiler on the CPU")
    torch._dynamo.reset()
    with CountKernels.compiling():
        compiled = torch.compile(_tiny_conv_step)
        with CountKernels() as first:            # this call compiles
            step(compiled)
        with CountKernels() as later:
            step(compiled)
    k = later.count
    # forward: relu, then batch norm + relu + mul + add + sum as one; backward: one or two fused
    # kernels around the conv's backward
    assert k.by_name["inductor"] >= 3 and k.by_name["convolution"] == k.by_name["convolution_backward"] == 1
    assert "relu" not in k.by_name and "native_batch_norm" not in k.by_name
    assert k.kernels < eager.count.kernels
    assert first.count.kernels == k.kernels         # the compile's fake-tensor ops are not counted


def test_a_compiled_variants_one_count_is_its_kernels():
    """`measure(kernels=True)` counts a step it cannot dispatch-count (`countable` is false for a
    compiled variant) from the profiler, and the table prints it beside no writing ops."""
    bench = load_bench()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)

    def make():
        compiled = torch.compile(_tiny_conv_step, backend="eager")     # traced, run as eager ops

        def step(i):
            x.grad = w.grad = None
            compiled(x, w).backward()
        return step, 2, list
    torch._dynamo.reset()
    fig = bench.measure("nb201", "fused_dense+compile", make, torch.device("cpu"), 1, 1,
                        count=False, kernels=True)
    assert fig.writing_ops is None and fig.kernels == 13
    assert dict(fig.kernels_by_op)["convolution_backward"] == 1
    row = bench.table([fig]).splitlines()[-1].split()
    assert row[8:11] == ["-", "-", "13"]          # no ops nor writing ops counted; the kernels
    assert bench.kernels_countable("cpu") and not bench.kernels_countable("cuda")


def test_a_compiled_variants_warm_up_is_split_by_torch_compiles_own_timers():
    """`measure` keeps the seconds each of torch.compile's timers ran in the warm-up, where the
    compile falls (`compile_seconds`), and the report prints them per compiled variant: what part
    of a compile is dynamo's and AOTAutograd's trace (the same Python on any device) and what is
    inductor's. A variant that compiles nothing has none, and a second compiled figure whose code
    is already traced has none either: the timers are differenced, not read as totals."""
    bench = load_bench()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)

    def make(compiled: bool):
        def make_step():
            fn = torch.compile(_tiny_conv_step, backend="aot_eager") if compiled else _tiny_conv_step

            def step(i):
                x.grad = w.grad = None
                fn(x, w).backward()
            return step, 2, list
        return make_step
    torch._dynamo.reset()
    plain = bench.measure("nb201", "fused", make(False), torch.device("cpu"), 1, 1, count=False)
    first = bench.measure("nb201", "fused+compile", make(True), torch.device("cpu"), 1, 1, count=False)
    again = bench.measure("nb201", "fused+compile", make(True), torch.device("cpu"), 1, 1, count=False)
    assert plain.compile_s is None and again.compile_s is None       # traced by `first` already
    assert first.compile_s["bytecode_tracing"] > 0 and first.compile_s["aot_trace_joint_graph"] > 0
    assert "compile_fx_inner" not in first.compile_s                 # aot_eager: no inductor
    assert all(0 < s <= first.warmup_s for s in first.compile_s.values())
    report = bench.compile_table([plain, first]).splitlines()
    assert report[0].startswith("compile: seconds of torch.compile's timers")
    row = report[-1].split()
    assert row[:2] == ["nb201", "fused+compile"] and len(report) == 4        # the compiled figure alone
    # warm-up, dynamo trace, AOT joint, then inductor's three and the Triton wait: not run here
    assert float(row[3]) == pytest.approx(first.compile_s["bytecode_tracing"], abs=0.06)
    assert row[5:] == ["-"] * 4
    assert bench.compile_table([plain]) == ""


def test_the_op_counter_names_where_each_writing_op_comes_from():
    sys.path.insert(0, str(BENCH.parent))
    from opcount import CountOps

    x = torch.randn(4, 8, requires_grad=True)

    def loss():
        return (x * 2).relu().sum()
    with CountOps(sites=True) as k:
        loss().backward()
    sites = {(name, site): n for name, site, n in k.count.by_site()}
    here = f"tests/test_bench.py:{loss.__code__.co_firstlineno + 1} (loss)"
    assert sites[("mul", here)] == sites[("relu", here)] == sites[("sum", here)] == 1
    assert sites[("threshold_backward", "backward of ReluBackward0")] == 1
    assert sites[("mul", "backward of MulBackward0")] == 1
    assert sum(sites.values()) == k.count.writing_ops
    x.grad = None
    with CountOps() as plain:                  # by default no stack walk, no sites
        loss().backward()
    assert plain.count.writing_ops == k.count.writing_ops and not plain.count.writing_by_site


def test_the_op_counter_counts_a_batchs_4d_writes_by_memory_format():
    sys.path.insert(0, str(BENCH.parent))
    import collections

    from opcount import CountOps, OpCount
    bench = load_bench()

    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    with CountOps(batch=2) as k:
        y = torch.nn.functional.conv2d(x, w, padding=1).relu()     # 2 NHWC activations
        y.contiguous()                                             # 1 NCHW copy
        y.permute(0, 2, 3, 1)                                      # a view: writes nothing
        w * 2                                                      # not the batch's
        x[:, :1] * 2                                               # one channel: either layout
        x.mean((2, 3), keepdim=True) * 2                           # 1×1: either layout
    assert k.count.activation_writes == collections.Counter(nhwc=2, nchw=1)
    with CountOps() as plain:                                      # without a batch: not counted
        y.contiguous()
    assert not plain.count.activation_writes
    # a variant's off-layout writes: NCHW ones if it runs channels_last, NHWC ones else
    count = OpCount(activation_writes=collections.Counter(nchw=2, nhwc=5))
    assert bench.off_layout(count, "fused_dense+cl") == bench.off_layout(count, "nascore+fused+bf16") == 2
    assert bench.off_layout(count, "reference") == bench.off_layout(count, "nascore+fused+amp") == 5


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_the_op_counter_counts_a_convs_flops_forward_and_backward(groups):
    """2 FLOPs per multiply-add; the input and the weight gradient each as many as the forward,
    grouped convs included (torch's flop_counter counts a grouped conv's input gradient as if it
    were ungrouped)."""
    sys.path.insert(0, str(BENCH.parent))
    from opcount import CountOps
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    w = torch.randn(32, 16 // groups, 3, 3, requires_grad=True)
    forward = 2 * (2 * 32 * 6 * 6) * (16 // groups) * 9
    with CountOps() as c:
        y = torch.nn.functional.conv2d(x, w, padding=1, groups=groups)
    assert c.count.flops == forward
    with CountOps() as c:
        y.sum().backward()
    assert c.count.flops == 2 * forward
    w.requires_grad_(False)
    y = torch.nn.functional.conv2d(x, w, padding=1, groups=groups)
    with CountOps() as c:
        y.sum().backward()                      # the input's gradient alone
    assert c.count.flops == forward
    with CountOps() as c:
        torch.bmm(torch.randn(3, 4, 5), torch.randn(3, 5, 6))
        torch.addmm(torch.randn(4, 6), torch.randn(4, 5), torch.randn(5, 6))
    assert c.count.flops == 2 * 3 * 4 * 5 * 6 + 2 * 4 * 5 * 6


def test_the_op_counter_follows_the_bytes_live_tensors_hold():
    sys.path.insert(0, str(BENCH.parent))
    import torch
    from opcount import CountOps

    big, n = torch.randn(1000), 1000 * 4

    def peak_above_start(f):
        with CountOps() as c:
            f()
        return c.count.peak_bytes - c.count.start_bytes

    def chain():
        t = (big * 2).relu()          # big * 2 is alive while relu writes its result: 2n
        del t

    def loop():
        last = None
        for _ in range(5):            # each product replaces the last: never more than two alive
            last = big * 3
        return last
    assert peak_above_start(chain) == 2 * n
    assert peak_above_start(loop) == 2 * n
    assert peak_above_start(lambda: big.view(10, 100).t()) == 0        # views hold no new bytes
    # tensors alive on entry are part of the count
    with CountOps() as without:
        pass
    held = torch.empty(10**6)
    with CountOps() as with_held:
        pass
    # (to within what other tests' leftovers free in between: tens of kB, against these 4 MB)
    assert with_held.count.start_bytes - without.count.start_bytes == pytest.approx(held.nbytes, abs=2**16)
    with CountOps(device="meta") as other_device:      # only the device asked for
        big * 2
    assert other_device.count.peak_bytes == 0


def test_the_op_counter_skips_tensors_without_memory_left_alive_by_a_trace():
    # torch.compile's caches can keep FakeTensors alive; whichever test ran before in the same
    # process, the count must neither fail on them nor count them
    sys.path.insert(0, str(BENCH.parent))
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from opcount import CountOps

    with CountOps() as before:
        pass
    with FakeTensorMode():
        fake = torch.empty(10**6)
    with CountOps() as with_fake:
        (torch.ones(8) * 2).sum()
    assert with_fake.count.start_bytes == pytest.approx(before.count.start_bytes, abs=2**16)   # not its 4 MB
    assert with_fake.count.ops == 3
    del fake


def _science():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("science", BENCH.parent / "science.py")
    science = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(science)
    return science


def _run(variant, seed, losses, cell="|skip_connect~0|+|none~0|none~1|+|none~0|none~1|none~2|"):
    return {"variant": variant, "seed": seed, "epochs": [{"epoch": e + 1, "train_loss": x} for e, x in enumerate(losses)],
            "genotype_str": cell, "param_free_ops": cell.count("skip") + cell.count("none"),
            "skip_share": cell.count("skip") / 6}


def test_science_compare_tells_a_shifted_variant_from_rounding():
    science = _science()
    eager = [[2.0 + 0.1 * s, 1.5 + 0.1 * s] for s in range(4)]            # seeds spread by 0.1
    conv = "|nor_conv_3x3~0|+|nor_conv_3x3~0|none~1|+|nor_conv_3x3~0|none~1|none~2|"
    runs = [_run("eager", s, eager[s]) for s in range(4)]
    runs += [_run("same", s, [x + 1e-6 * (-1) ** s for x in eager[s]]) for s in range(4)]
    runs += [_run("shifted", s, [x + 0.05 + 1e-3 * (-1) ** s for x in eager[s]], cell=conv) for s in range(3)]
    report = science.compare(runs, metrics=("train_loss",))
    same, shifted = report["same"], report["shifted"]
    assert [r["agrees"] for r in same["metrics"]["train_loss"]] == [True, True]
    assert same["cells"]["same_cell"] == 4 and same["cells"]["collapsed"] == {"eager": 0, "same": 0}
    # a shift half the seeds' own spread, on every seed: found, although each run is within the spread
    rows = shifted["metrics"]["train_loss"]
    assert shifted["seeds"] == [0, 1, 2] and not any(r["agrees"] for r in rows)
    assert rows[-1]["diff"] == pytest.approx(0.05, abs=2e-3) and rows[-1]["baseline_sd"] == pytest.approx(0.1)
    assert shifted["cells"]["same_cell"] == 0 and not shifted["cells"]["param_free_ops"]["agrees"]
    # cells whose every path from the input passes `none` (runs without the field: from the cell)
    assert same["cells"]["cut_off"] == {"eager": 4, "same": 4}
    assert shifted["cells"]["cut_off"] == {"eager": 3, "shifted": 0}
    mean, half = science.t_interval([1.0, 3.0])          # t(0.975, 1) = 12.706, sd √2, n 2
    assert mean == 2.0 and half == pytest.approx(12.706 * 2 ** 0.5 / 2 ** 0.5, rel=1e-4)


def test_science_runs_paired_searches_on_an_image_tree_and_resumes(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    science = _science()
    rng = np.random.default_rng(0)
    for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
        (tmp_path / "tree" / "train" / c).mkdir(parents=True)
        for k in range(13):                 # 130 images: 65 + 65, one batch of 64 per half
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "tree" / "train" / c / f"{k}.png")
    out = tmp_path / "science.json"
    args = ["--data", str(tmp_path / "tree"), "--cache", str(tmp_path / "cache"), "--variants", "fused",
            "--seeds", "1,2", "--images", "0", "--epochs", "2", "--channels", "4", "--device", "cpu",
            "--json", str(out)]
    science.main(args)
    saved = json.loads(out.read_text())
    assert sorted((r["variant"], r["seed"]) for r in saved["runs"]) == \
        [("eager", 1), ("eager", 2), ("fused", 1), ("fused", 2)]
    by = {(r["variant"], r["seed"]): r for r in saved["runs"]}
    for s in (1, 2):           # the same search, steps computed another way: equal to fp32 rounding
        assert len(by["fused", s]["epochs"]) == 2
        assert by["fused", s]["epochs"][-1]["train_loss"] == pytest.approx(by["eager", s]["epochs"][-1]["train_loss"],
                                                                           abs=1e-4)
        assert by["fused", s]["genotype_str"] == by["eager", s]["genotype_str"]
    assert by["eager", 1]["epochs"][0]["train_loss"] != by["eager", 2]["epochs"][0]["train_loss"]   # seeds differ
    import torch
    assert by["eager", 1]["threads"] == torch.get_num_threads()     # what the rounding depends on
    from nascore.genotype import NB201Genotype
    assert by["eager", 1]["input_reaches_output"] == \
        NB201Genotype.from_arch_string(by["eager", 1]["genotype_str"]).input_reaches_output()
    assert saved["report"]["fused"]["cells"]["cut_off"] == {
        w: sum(not by[w, s]["input_reaches_output"] for s in (1, 2)) for w in ("eager", "fused")}
    assert all(r["agrees"] for r in saved["report"]["fused"]["metrics"]["train_loss"])
    capsys.readouterr()
    science.main(args)                      # resumed: every run is there, none is searched again
    assert "seed 1: train loss" not in capsys.readouterr().out
    science.main([*args, "--seeds", "1"])   # a report on fewer seeds keeps the others' runs in the file
    assert "seeds [1]" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["runs"]) == 4
    with pytest.raises(SystemExit):         # other settings never mix into the same file
        science.main([*args, "--epochs", "1"])
    # --control: eager runs made another way (here eager's own, every train loss +0.5), reported as
    # a variant against eager and as the baseline every variant is paired with as well
    shifted = [dict(r, epochs=[dict(e, train_loss=e["train_loss"] + 0.5) for e in r["epochs"]])
               for r in saved["runs"] if r["variant"] == "eager"]
    control = tmp_path / "control.json"
    control.write_text(json.dumps({**saved, "runs": shifted}))
    capsys.readouterr()
    science.main([*args, "--control", str(control)])
    out_text = capsys.readouterr().out
    assert "control - eager, paired over seeds [1, 2]" in out_text and "fused - control" in out_text
    report = json.loads(out.read_text())
    assert report["report"]["control"]["metrics"]["train_loss"][-1]["diff"] == pytest.approx(0.5)
    vs = report["report_vs_control"]["fused"]["metrics"]["train_loss"][-1]
    assert vs["diff"] == pytest.approx(-0.5, abs=1e-4) and not vs["agrees"]
    assert "control" not in {r["variant"] for r in report["runs"]}      # the file keeps its own runs only
    control.write_text(json.dumps({**saved, "settings": {**saved["settings"], "epochs": 3}, "runs": shifted}))
    with pytest.raises(SystemExit):
        science.main([*args, "--control", str(control)])


def second_step_counts(variant: str):
    """What the bench's DARTS first-order step of `variant` dispatches at the tiny size, its second
    step counted (the first fills the forward's caches)."""
    bench = load_bench()
    from opcount import CountOps
    torch.manual_seed(0)
    step, _, counters = bench.nascore_step("darts_first", bench.SIZES["tiny"], torch.device("cpu"),
                                           **bench.speed_options(variant))
    step(0)
    with CountOps(counters()) as c:
        step(1)
    return c.count


def test_the_unmerged_and_grouped_variants_run_fused_dense_without_its_trades():
    """`+unmerged` measures what `merge_conv_groups` trades: the same step with one conv per op
    name (DARTS space: sep and dil 3×3 apart from 5×5) dispatches more kernels; `+grouped`, what
    `block_diagonal` does: it builds no block-diagonal weights; `+chained`, what `fused.mix` does:
    one weighted add per op kind and state, and sums per merged group and paired pass, instead of
    one product per pass; `+kindbn`, what `fused.batch_norm_pass` does: one BN per op kind, not
    one per pass."""
    writing = {variant: second_step_counts(variant).writing_ops
               for variant in ("fused_dense", "fused_dense+unmerged", "fused_dense+grouped", "fused_dense+chained",
                               "fused_dense+kindbn")}
    assert writing["fused_dense"] < 0.9 * writing["fused_dense+unmerged"], writing
    # block-diagonal weights: a mask multiply per strided paired conv, forward and backward
    assert writing["fused_dense"] > writing["fused_dense+grouped"], writing
    assert writing["fused_dense"] < 0.9 * writing["fused_dense+chained"], writing
    assert writing["fused_dense"] < 0.95 * writing["fused_dense+kindbn"], writing


def test_the_dp_variant_measures_a_step_with_search_time_drop_path():
    """`+dp`: RobustDARTS' regularised search, drop-path on the op outputs. Its step draws masks
    (eager: per op; fused: one draw per forward, the factors in each pass's product), so it
    dispatches more than the same step without, the fused one far fewer than the eager one."""
    writing, draws = {}, {}
    for variant in ("eager", "eager+dp", "fused_dense", "fused_dense+dp"):
        count = second_step_counts(variant)
        writing[variant] = count.writing_ops
        draws[variant] = count.by_op["bernoulli"] + count.by_op["bernoulli_"]
    assert draws["eager"] == draws["fused_dense"] == 0
    assert draws["fused_dense+dp"] == 2            # one per training forward: the α step's and the weights'
    assert draws["eager+dp"] > 50 * draws["fused_dense+dp"], draws
    assert writing["eager"] < writing["eager+dp"] and writing["fused_dense"] < writing["fused_dense+dp"], writing
    assert writing["fused_dense+dp"] < writing["eager+dp"] / 5, writing


def test_a_cpu_bf16_channels_last_retrain_nan_is_blamed_on_the_cpus_dilated_conv_gradients(monkeypatch):
    # the bench turns nascore's refusal off for its CPU counts: a non-finite loss of such a
    # variant then says why, and where the probe finds the gradients right, nothing is added
    bench = load_bench()
    error = NonFiniteLossError("non-finite training loss or gradient norm at epoch 1/3", 1, 1)
    cpu = torch.device("cpu")
    from nascore.genotype import DARTS_V2
    from nascore.networks import NetworkCIFAR
    net = NetworkCIFAR(DARTS_V2, 4, 10, 3, auxiliary=False)      # dil_conv: a dilated conv that trains
    monkeypatch.setattr(bench, "cpu_bf16_dilated_grads_ok", lambda: False)
    hint = bench.why_nonfinite(error, "nascore+fused_dense+bf16", cpu, net)
    assert "dilated-conv" in hint and "+amp" in hint and torch.__version__ in hint
    for other in ((ValueError("x"), "nascore+fused_dense+bf16", cpu),     # another failure
                  (error, "nascore+fused_dense+amp", cpu),                # bf16 in NCHW: right
                  (error, "nascore+fused_dense+bf16", torch.device("cuda")),
                  (error, "reference", cpu)):
        assert bench.why_nonfinite(*other, net) == ""
    monkeypatch.setattr(bench, "cpu_bf16_dilated_grads_ok", lambda: True)
    assert bench.why_nonfinite(error, "nascore+fused_dense+bf16", cpu, net) == ""


def test_the_tracing_bench_counts_each_kind_of_trace_and_where_dynamo_steps(tmp_path):
    """bench/tracing.py: dynamo alone traces a compiled NB201 search, 3 kinds of call × 3 cell
    shapes, and names the Python it stepped through. None of it in `torch.nn`'s containers: an
    op's parts are read with `fused.part`, not `nn.Sequential.__getitem__`, which dynamo steps
    through as Python (half a DARTS cell's trace with it)."""
    run = subprocess.run([sys.executable, str(BENCH.parent / "tracing.py"), "--size", "tiny", "--cases", "nb201",
                          "--top", "4", "--json", str(tmp_path / "tracing.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads((tmp_path / "tracing.json").read_text())["results"]
    assert result["traces"] == 9 and result["graph_nodes"] > 0 and result["dynamo_s"] > 0
    steps = [t["bytecodes"] for t in result["top"]]
    assert len(steps) == 4 and steps == sorted(steps, reverse=True) and result["bytecodes"] >= sum(steps)
    assert result["by_file"]["fused.py"] > result["bytecodes"] / 2
    assert "container.py" not in result["by_file"], result["by_file"]
    assert "nb201" in run.stdout and "where the tracer stepped most" in run.stdout
    refused = subprocess.run([sys.executable, str(BENCH.parent / "tracing.py"), "--cases", "nb201_valid"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "unknown case(s) nb201_valid; the cases are darts_first" in refused.stderr
