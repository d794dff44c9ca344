"""SM clock and power while the block-sparse kernel and SDPA are timed (run on a GPU).

    python3 -m patchattn.evals.bench.clock_probe --cases 64k:sdpa,64k:0.05 --out clocks.json

Why: under Nsight Compute (one launch, idle GPU before it) the kernel at 64k and density 0.05
took 1.12x of density x SDPA, while the benchmark's back-to-back timings give about 1.20x. This
times every case of ncu_block_sparse (N:sdpa, N:DENSITY, N:diagonal) in three ways while
`nvidia-smi` samples the SM clock, power and throttle reasons every 20 ms:
* queued: repetitions enqueued back to back (prefill's `--timing queued`), about 1 s of work;
* synced: each repetition waited for before the next is enqueued;
* rested: synced, with 200 ms of idle GPU before each repetition (ncu's conditions);
* hot: queued, right after about 300 ms of back-to-back SDPA at the same length, so the case
  starts at the clock SDPA leaves behind (prefill's `--ratio-rounds` pairs its timings so).
Prints one row per case and mode and, for each density case, its time over density x the same
mode's SDPA time at that length. Writes the rows and the raw samples' summaries as JSON.

With `--trace R`, each density case is also run R times back to back, once after 2 s of idle
GPU ("rested") and once right after the heat ("hot"), with every repetition's time kept
(`rep_trace`), and the medians of successive windows of repetitions printed: a kernel whose
time drifts while it runs (clock, power or temperature management) shows it there, and a
single timing's number of repetitions then decides what it reports.

With `--host`, also the host time of one call (the Python wrapper and launch, measured while a
`torch.cuda._sleep` keeps the GPU busy, so no call waits for the GPU) and, with `--host-profile
FILE`, cProfile's top functions over those calls: in `synced` mode a call's host time lies
inside its timing, and in `queued` mode it is the floor of the timing when it exceeds the
kernel's time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from patchattn.evals.bench.ncu_block_sparse import case_runner
from patchattn.evals.bench.prefill import causal_pairs, cuda_time, parse_lengths, queued_times

QUERY = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
MODES = ("queued", "synced", "rested", "hot")  # prefill.TIMING, and "hot" (module docstring)
HEAT_MS = 300.0


class ClockSampler:
    """nvidia-smi sampling into a temporary file in the background; `stop()` returns the lines."""

    def __init__(self, period_ms: int = 20):
        self.file = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            ["nvidia-smi", "-i", str(torch.cuda.current_device()), f"--query-gpu={QUERY}",
             "--format=csv,noheader,nounits", f"-lms={period_ms}"], stdout=self.file, text=True)

    def stop(self) -> list:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.file.seek(0)
        return [line for line in self.file.read().splitlines() if line.strip()]


def _parse(lines):
    rows = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        try:
            stamp = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
            stamp += float("0." + parts[0].split(".")[1]) if "." in parts[0] else 0.0
            rows.append((stamp, float(parts[1]), float(parts[2]), float(parts[3]), parts[4]))
        except ValueError:
            continue
    return rows


def summarize(samples, start: float, end: float) -> dict:
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return {"samples": 0}
    return {"samples": len(inside), "sm_mhz_mean": statistics.mean(s[1] for s in inside),
            "sm_mhz_min": min(s[1] for s in inside), "power_w_mean": statistics.mean(s[2] for s in inside),
            "power_w_max": max(s[2] for s in inside), "temp_c_max": max(s[3] for s in inside),
            "throttle_reasons": sorted({s[4] for s in inside})}


def heat(sdpa_run, ms: float = HEAT_MS) -> None:
    """Enqueue SDPA back to back for about `ms` of GPU time and wait for it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    sdpa_run()
    end.record()
    end.synchronize()
    for _ in range(max(0, int(ms / max(start.elapsed_time(end), 1e-3)) - 1)):
        sdpa_run()
    torch.cuda.synchronize()


def time_mode(run, mode: str, budget_ms: float = 1000.0, heater=None) -> tuple:
    """(median ms, wall start, wall end) of `run` timed in `mode` (prefill.cuda_time; the wall
    span, which selects the clock samples, includes its warm-up). Rested timings stop at 15
    repetitions: 3 s of rests. "hot" calls `heater()` first and times queued, with a budget
    small enough (100 ms) that the clock has no time to recover."""
    if mode == "hot":
        heater()
        start = time.time()
        return (cuda_time(run, budget_ms=100.0, min_reps=5, max_reps=200, mode="queued", steady_ms=0.0), start,
                time.time())
    start = time.time()
    # steady_ms=0: each mode starts from the state its name says (the module docstring)
    ms = cuda_time(run, budget_ms=budget_ms, min_reps=5, max_reps=15 if mode == "rested" else 200, mode=mode,
                   steady_ms=0.0)
    return ms, start, time.time()


TRACE_WINDOWS = ((0, 10), (10, 40), (40, 100), (100, 200), (200, None))


def rep_trace(run, reps: int, warmup: int = 2) -> list:
    """Milliseconds of each of `reps` repetitions of run(), enqueued back to back (as cuda_time's
    queued mode, but every repetition kept, in order)."""
    for _ in range(warmup):
        run()
    return queued_times(run, reps)


def window_medians(times: list) -> dict:
    """Median of each TRACE_WINDOWS slice of `times` that holds any repetition ("lo-hi": ms)."""
    out = {}
    for lo, hi in TRACE_WINDOWS:
        part = times[lo:hi]
        if part:
            out[f"{lo}-{lo + len(part)}"] = statistics.median(part)
    return out


def host_us(run, calls: int = 50, profile=None) -> float:
    """Host microseconds per call of `run`, the GPU kept busy meanwhile (see the module docstring)."""
    run()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work ahead of the calls
    if profile is not None:
        profile.enable()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    elapsed = time.perf_counter() - start
    if profile is not None:
        profile.disable()
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="64k:sdpa,64k:0.05", help="comma list of N:sdpa, N:DENSITY, N:diagonal")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--trace", type=int, default=0, metavar="R",
                   help="also R repetitions of each density case after a rest and after the heat, each kept")
    p.add_argument("--host", action="store_true", help="also the host time of one call")
    p.add_argument("--host-profile", type=Path, help="cProfile's top functions of those calls, into this file")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        p.error(f"--modes: choose from {','.join(MODES)}")
    sampler = ClockSampler()
    time.sleep(0.5)
    spans, hosts, profiles, traces = [], {}, [], []
    for case in args.cases.split(","):
        length, _, kind = case.partition(":")
        (n,) = parse_lengths(length)
        run, name, pairs = case_runner(n, kind)
        tracing = bool(args.trace) and pairs is not None
        heater = None
        if "hot" in modes or tracing:  # one SDPA runner per case serves the hot mode and the trace
            sdpa_run = run if kind == "sdpa" else case_runner(n, "sdpa")[0]
            heater = lambda: heat(sdpa_run)  # noqa: E731
        for mode in modes:
            ms, start, end = time_mode(run, mode, heater=heater)
            spans.append({"case": case, "n": n, "kernel": name, "mode": mode, "ms": ms,
                          "density": None if pairs is None else pairs / causal_pairs(n), "start": start, "end": end})
        if tracing:
            for start_state, settle in (("rested", lambda: time.sleep(2.0)), ("hot", heater)):
                settle()
                times = rep_trace(run, args.trace)
                traces.append({"case": case, "after": start_state, "density": pairs / causal_pairs(n),
                               "ms": times, "window_medians": window_medians(times)})
        if args.host or args.host_profile:
            hosts[case] = host_us(run)
        if args.host_profile:  # a second pass: the profiler's own cost stays out of hosts[case]
            profile = cProfile.Profile()
            profiled = host_us(run, profile=profile)
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(25)
            profiles.append(f"## {case} ({name}): {hosts[case]:.1f} us per call, {profiled:.1f} us under cProfile\n"
                            f"{text.getvalue()}")
        del run, heater
        torch.cuda.empty_cache()
    samples = _parse(sampler.stop())
    sdpa = {(r["n"], r["mode"]): r["ms"] for r in spans if r["kernel"] == "sdpa"}
    print("| case | kernel | mode | ms | vs density x SDPA | SM MHz mean / min | W mean / max | throttle |")
    print("|---|---|---|---|---|---|---|---|")
    for r in spans:
        r.update(summarize(samples, r.pop("start"), r.pop("end")))
        ref = sdpa.get((r["n"], r["mode"]))
        r["ratio_vs_density_x_sdpa"] = ref and r["density"] and r["ms"] / (r["density"] * ref)
        ratio = f"{r['ratio_vs_density_x_sdpa']:.3f}" if r["ratio_vs_density_x_sdpa"] else "-"
        clocks = (f"{r['sm_mhz_mean']:.0f} / {r['sm_mhz_min']:.0f}" if r["samples"] else "-")
        power = f"{r['power_w_mean']:.0f} / {r['power_w_max']:.0f}" if r["samples"] else "-"
        print(f"| {r['case']} | {r['kernel']} | {r['mode']} | {r['ms']:.3f} | {ratio} | {clocks} | {power} "
              f"| {' '.join(r.get('throttle_reasons', []))} |")
    for t in traces:
        windows = ", ".join(f"{k}: {v:.3f}" for k, v in t["window_medians"].items())
        print(f"trace {t['case']} after {t['after']} (ms per repetition, median by repetitions): {windows}")
    for case, us in hosts.items():
        print(f"host time per call, {case}: {us:.1f} us")
    if args.host_profile:
        args.host_profile.parent.mkdir(parents=True, exist_ok=True)
        args.host_profile.write_text("\n".join(profiles))
    if args.out:
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "query": QUERY,
                  "rows": spans, "host_us_per_call": hosts, "traces": traces}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
