"""Benchmark report helpers that run without a GPU (on saved or synthetic results)."""

import json

import pytest
from conftest import STORIES, needs

pytest.importorskip("triton")
from patchattn.evals.bench.prefill import block_sparse_cost_model, break_even_table  # noqa: E402


@pytest.fixture
def fake_cuda_clock(monkeypatch):
    """CUDA events that read a fake clock (the returned dict's "now", in ms), which the timed
    function advances; call it with the module whose torch.cuda is to be faked."""
    clock = {"now": 0.0}

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock["now"]

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return other.t - self.t

    def install(module):
        monkeypatch.setattr(module.torch.cuda, "Event", Event)
        monkeypatch.setattr(module.torch.cuda, "synchronize", lambda: None)
        return clock

    return install


def test_cost_model_recovers_fixed_and_per_pair_cost():
    # time = 0.7 ms + 1.2 x density x SDPA (20 ms), at three densities, plus the all-blocks row
    rows = [{"density": d, "block_sparse_ms": 0.7 + 1.2 * d * 20.0} for d in (0.05, 0.1, 0.3)]
    report = {"results": [{"n": 32768, "sdpa_ms": 20.0, "block_sparse_b128": rows,
                           "block_sparse_b128_all_blocks_ms": 25.0, "block_sparse_b128_config": "x"}]}
    (fit,) = block_sparse_cost_model(report)
    assert fit["n"] == 32768 and fit["block"] == 128
    assert fit["fixed_ms"] == pytest.approx(0.7) and fit["per_pair_vs_sdpa"] == pytest.approx(1.2)
    assert fit["all_blocks_vs_sdpa"] == pytest.approx(1.25)


def test_cost_model_needs_two_densities():
    report = {"results": [{"n": 8192, "sdpa_ms": 1.0, "block_sparse_b64": [{"density": 0.1, "block_sparse_ms": 0.2}]}]}
    assert block_sparse_cost_model(report) == []


def test_break_even_is_the_shortest_length_winning_from_there_on():
    rows = [{"n": n, "methods": {"m": {"speedup_vs_sdpa": sp}}} for n, sp in ((8192, 0.5), (16384, 1.1), (32768, 0.9),
                                                                               (65536, 2.0))]
    assert break_even_table(rows, ["m", "absent"]) == {"m": 65536, "absent": None}


def _ncu_source_csv(path, kernels):
    """A source-page CSV as `ncu --page source --print-source sass --csv` writes it."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        for name, rows in kernels:
            w.writerow(["Kernel Name", name])
            w.writerow(["Address", "Source", "Warp Stall Sampling (All Samples)",
                        "Warp Stall Sampling (Not-issued Samples)", "# Samples", "Instructions Executed"])
            for i, (sass, samples, executed) in enumerate(rows):
                w.writerow([hex(i * 16), sass, samples, 0, samples, executed])


def test_ncu_source_summary_splits_partitions_and_per_item_time(tmp_path):
    from patchattn.evals.bench.ncu_source_summary import main, read_kernels, summarise

    compute = [("USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xf0", 0, 8),
               ("IMAD R1, R2, R3, RZ", 30, 8),  # per item (executed 8 times)
               ("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ", 10, 80),  # per tile (80)
               ("SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR5], R9", 5, 80),
               ("@!P0 BRA 0x10", 15, 80),  # the wait loop's branch: an mbarrier wait
               ("WARPGROUP.DEPBAR.LE gsb0, 0x0", 20, 80),
               ("STG.E desc[UR4][R2.64], R5", 20, 8)]
    loader = [("USETMAXREG.DEALLOC.CTAPOOL 0x18", 0, 1), ("ATOMG.E.ADD.STRONG.GPU PT, R11, [R10.64], R13", 10, 8),
              ("SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR21], R9", 2, 80), ("@!P1 BRA 0x20", 8, 80)]
    idle = [("USETMAXREG.DEALLOC.CTAPOOL 0x18", 0, 1), ("BAR.SYNC.DEFER_BLOCKING 0x1", 0, 1), ("NOP", 50, 1)]
    path = tmp_path / "src.csv"
    _ncu_source_csv(path, [("fill_kernel", [("MOV R1, R2", 1, 1)]),
                           ("_block_sparse_fwd_sm90_wsp", [("LDC R1, c[0x0][0x28]", 0, 1)] + compute + loader + idle)])
    (_, _), (name, instructions) = read_kernels(str(path))
    assert name == "_block_sparse_fwd_sm90_wsp" and len(instructions) == 1 + len(compute) + len(loader) + len(idle)
    parts = {p["label"]: p for p in summarise(instructions)["partitions"]}
    assert set(parts) == {"compute", "loader", "idle (finished warps)"}
    c = parts["compute"]
    assert c["samples"] == 100 and c["per_item_executions"] == 8 and c["per_item_share"] == pytest.approx(0.5)
    assert c["kinds"]["mbarrier wait"] == pytest.approx(0.2) and c["kinds"]["wgmma wait"] == pytest.approx(0.2)
    assert "branch" not in c["kinds"]
    assert parts["loader"]["kinds"]["mbarrier wait"] == pytest.approx(0.5)
    out = tmp_path / "summary.json"
    assert main([str(path), "--out", str(out)]) == 0 and out.exists()
    with pytest.raises(SystemExit, match="no kernel"):
        main([str(path), "--kernel", "absent_kernel"])


def test_clock_probe_summarizes_samples_inside_each_timed_span():
    from patchattn.evals.bench.clock_probe import _parse, summarize

    lines = ["2026/12/04 03:50:12.100, 1980, 300.5, 50, 0x0000000000000000",
             "2026/12/04 03:50:12.300, 1650, 699.0, 55, 0x0000000000000004",
             "not a sample",
             "2026/12/04 03:50:14.000, 1400, 100.0, 60, 0x0000000000000004"]
    samples = _parse(lines)
    assert len(samples) == 3
    first = samples[0][0]
    assert samples[1][0] - first == pytest.approx(0.2)
    span = summarize(samples, first, first + 0.5)  # the third sample lies outside
    assert span["samples"] == 2
    assert span["sm_mhz_mean"] == pytest.approx(1815.0) and span["sm_mhz_min"] == 1650.0
    assert span["power_w_max"] == 699.0 and span["temp_c_max"] == 55.0
    assert span["throttle_reasons"] == ["0x0000000000000000", "0x0000000000000004"]
    assert summarize(samples, first + 10, first + 11) == {"samples": 0}


def test_interleaved_ratios_pair_each_sparse_timing_with_the_dense_one_before_it():
    from patchattn.evals.bench.prefill import interleaved_ratios

    # the dense run slows down round by round (a GPU reaching its power cap); each ratio uses
    # its own round's dense time
    times = iter([10.0, 0.6, 12.0, 0.6, 11.0, 0.66])
    calls = []

    def timer(fn):
        calls.append(fn())
        return next(times)

    got = interleaved_ratios(lambda: "dense", lambda: "sparse", 0.05, rounds=3, timer=timer)
    assert calls == ["dense", "sparse"] * 3
    assert got["ratios"] == pytest.approx([1.2, 1.0, 1.2])
    assert (got["median"], got["min"], got["max"]) == pytest.approx((1.2, 1.0, 1.2))
    assert got["rounds"] == 3


def test_prefill_tables_print_saved_runs_with_and_without_interleaved_rounds(capsys):
    import copy
    import json
    from pathlib import Path

    from patchattn.evals.bench.prefill import print_tables

    saved = Path(__file__).resolve().parents[1] / "evals/bench/results/h200/prefill_slots_default_h200.json"
    if not saved.exists():
        pytest.skip("saved run not in this checkout")
    report = json.loads(saved.read_text())
    print_tables(report)
    plain = capsys.readouterr().out
    assert "| 65536 | 128 | 0.048 | 3.40 | 58.39 | 4.41 | 1.20 |  |" in plain
    rounds = copy.deepcopy(report)
    row = next(r for r in rounds["results"] if r["n"] == 65536)["block_sparse_b128"][0]
    row["interleaved"] = {"rounds": 5, "ratios": [1.1] * 5, "median": 1.1, "min": 1.05, "max": 1.2}
    print_tables(rounds)
    assert "| 1.20 | 1.100 [1.050, 1.200] (5) |" in capsys.readouterr().out


def test_cuda_time_rests_before_each_rested_repetition(monkeypatch, fake_cuda_clock):
    from patchattn.evals.bench import prefill

    clock = fake_cuda_clock(prefill)
    sleeps = []
    monkeypatch.setattr(prefill.time, "sleep", sleeps.append)
    durations = iter([1.0] * 3 + [2.0, 4.0, 3.0])  # warm-up x2, sizing, then three repetitions

    def fn():
        clock["now"] += next(durations)

    assert prefill.cuda_time(fn, budget_ms=3.0, min_reps=3, max_reps=3, mode="rested") == 3.0
    assert sleeps == [0.2] * 3
    assert "rested" in prefill.TIMING


def test_clock_probe_hot_mode_heats_with_sdpa_then_times_queued(monkeypatch, fake_cuda_clock):
    from patchattn.evals.bench import clock_probe

    clock = fake_cuda_clock(clock_probe)
    calls = []

    def sdpa():
        calls.append("sdpa")
        clock["now"] += 30.0

    clock_probe.heat(sdpa, ms=300.0)
    assert calls == ["sdpa"] * 10  # the sizing launch and 9 more: 300 ms of 30-ms launches
    timed = []
    monkeypatch.setattr(clock_probe, "cuda_time", lambda run, **kw: timed.append(kw) or 1.5)
    calls.clear()
    ms, start, end = clock_probe.time_mode(lambda: None, "hot", heater=lambda: calls.append("heat"))
    assert ms == 1.5 and calls == ["heat"] and timed[0]["mode"] == "queued" and timed[0]["budget_ms"] == 100.0
    assert start <= end


def test_clock_probe_rep_trace_keeps_every_repetition_in_order(monkeypatch, fake_cuda_clock):
    from patchattn.evals.bench import clock_probe

    clock = fake_cuda_clock(clock_probe)
    durations = iter([5.0, 5.0] + [1.0 + 0.01 * i for i in range(250)])  # 2 warm-up calls, then a drift

    def run():
        clock["now"] += next(durations)

    times = clock_probe.rep_trace(run, 250)
    assert len(times) == 250 and times[0] == 1.0 and abs(times[-1] - 3.49) < 1e-9
    windows = clock_probe.window_medians(times)
    assert list(windows) == ["0-10", "10-40", "40-100", "100-200", "200-250"]
    assert abs(windows["0-10"] - 1.045) < 1e-9 and windows["200-250"] > windows["100-200"] > windows["0-10"]
    assert list(clock_probe.window_medians(times[:15])) == ["0-10", "10-15"]


def test_cuda_time_runs_the_kernel_to_its_steady_state_before_timing(monkeypatch, fake_cuda_clock):
    from patchattn.evals.bench import prefill

    clock = fake_cuda_clock(prefill)
    monkeypatch.setattr(prefill.time, "sleep", lambda s: None)
    calls = {"n": 0}

    def fn():  # 10 ms per call for the first 100 ms of GPU time (a boost window), then 12 ms
        calls["n"] += 1
        clock["now"] += 10.0 if clock["now"] < 100.0 else 12.0

    for mode in ("queued", "synced"):
        clock["now"], calls["n"] = 0.0, 0
        # 2 warm-up calls, the sizing call, 14 more to reach 150 ms, then 5 timed repetitions
        assert prefill.cuda_time(fn, budget_ms=50.0, min_reps=5, max_reps=5, mode=mode, steady_ms=150.0) == 12.0
        assert calls["n"] == 2 + 1 + 14 + 5
    clock["now"], calls["n"] = 0.0, 0
    assert prefill.cuda_time(fn, budget_ms=50.0, min_reps=5, max_reps=5, mode="queued", steady_ms=0.0) == 10.0
    clock["now"], calls["n"] = 0.0, 0
    prefill.cuda_time(fn, budget_ms=50.0, min_reps=5, max_reps=5, mode="rested", steady_ms=150.0)
    assert calls["n"] == 2 + 1 + 5  # a rested timing starts from rest: no warm-up run


@needs(STORIES)
def test_cpu_forward_bench_writes_its_rows(tmp_path, capsys):
    from patchattn.evals.bench import cpu_forward

    out = tmp_path / "cpu.json"
    assert cpu_forward.main(["--model", str(STORIES), "--tokens", "256", "--reps", "1", "--vs-scale", "0.1",
                             "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["dense", "uniform vertical_slash 0.1"]  # no plan ships for a folder
    assert rows[0]["density"] == 1.0 and 0 < rows[1]["density"] < 1 and all(r["seconds"] > 0 for r in rows)
    assert "| uniform vertical_slash 0.1 |" in capsys.readouterr().out
