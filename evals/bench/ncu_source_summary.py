"""Where a kernel's warps wait, per partition and per instruction kind, from Nsight Compute's
source page (SASS with warp-state samples):

    ncu --profile-from-start off --clock-control none --section WarpStateStats --section SourceCounters \\
        -o prof python3 -m patchattn.evals.bench.ncu_block_sparse --cases 32k:diagonal,32k:0.05
    ncu -i prof.ncu-rep --page source --print-source sass --csv | gzip > src.csv.gz
    python -m patchattn.evals.bench.ncu_source_summary src.csv.gz --out summary.json

A warp-specialised kernel's partitions are separate stretches of SASS, each entered through a
register reallocation (USETMAXREG); the stretches are labelled by what they contain (the loader
issues the atomic claim, the compute partitions the wgmma). In a compute partition, the
instructions executed once per work item (prologue, first q.K^T, last P.V, store) are told from
those of the per-tile loop by their execution count: the smallest count that many instructions
share is the per-item count, and a sample at an instruction run at most 1.5 times as often counts
as per-item time.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import json

# instruction kinds, first match wins (SASS opcode prefixes)
KINDS = (("wgmma wait", ("WARPGROUP.DEPBAR",)), ("wgmma issue", ("HGMMA",)),
         ("mbarrier wait", ("SYNCS.PHASECHK",)), ("mbarrier arrive", ("SYNCS.ARRIVE",)),
         ("warp-group barrier", ("BAR.SYNC", "BAR.ARV")), ("exp2", ("MUFU.EX2",)),
         ("max / min", ("FMNMX",)), ("shuffle", ("SHFL",)), ("shared memory", ("LDS", "STS", "STSM", "LDSM")),
         ("global memory", ("LDG", "STG", "ATOMG", "RED")), ("TMA", ("UTMA", "UBLKCP")),
         ("branch", ("BRA", "BSYNC", "BSSY")), ("nop", ("NOP",)))


def kind(sass: str) -> str:
    words = sass.split()
    op = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")
    for name, prefixes in KINDS:
        if op.startswith(prefixes):
            return name
    return "other arithmetic"


def kinds_of(instructions: list) -> list:
    """`kind` of each instruction, with the branch that closes an mbarrier try-wait loop (within
    three instructions after its SYNCS.PHASECHK) counted as the wait it spins on."""
    kinds = [kind(sass) for sass, _, _ in instructions]
    for i, k in enumerate(kinds):
        if k == "mbarrier wait":
            for j in range(i + 1, min(i + 4, len(kinds))):
                if kinds[j] == "branch":
                    kinds[j] = "mbarrier wait"
                    break
    return kinds


def read_kernels(path: str) -> list:
    """[(kernel name, [(sass, samples, executed)])] from ncu's source-page CSV (plain or gzip)."""
    raw = gzip.open(path, "rb").read() if path.endswith(".gz") else open(path, "rb").read()
    kernels, columns = [], None
    for row in csv.reader(io.StringIO(raw.decode("utf-8", "replace"))):
        if not row:
            continue
        if row[0] == "Kernel Name":
            kernels.append((row[1], []))
        elif row[0] == "Address":
            columns = {name: i for i, name in enumerate(row)}
        elif kernels and columns:
            kernels[-1][1].append((row[columns["Source"]].strip(),
                                   _count(row, columns, "Warp Stall Sampling (All Samples)"),
                                   _count(row, columns, "Instructions Executed")))
    return kernels


def _count(row: list, columns: dict, name: str) -> int:
    """A numeric cell ("1,234"; "", "-" or a missing column: 0)."""
    text = row[columns[name]].replace(",", "") if name in columns else ""
    return int(float(text)) if text not in ("", "-") else 0


def partitions(instructions: list, kinds: list) -> list:
    """[(label, first index, end index)]: stretches between register reallocations, labelled
    (kinds: `kinds_of(instructions)`)."""
    cuts = [0] + [i for i, (sass, _, _) in enumerate(instructions) if "USETMAXREG" in sass] + [len(instructions)]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        text = [sass for sass, _, _ in instructions[a:b]]
        if any("ATOMG" in s for s in text):
            label = "loader"
        elif any("HGMMA" in s for s in text):
            label = "compute"
        elif "nop" in kinds[a:b] and \
                all(k in ("nop", "warp-group barrier", "branch", "other arithmetic") for k in kinds[a:b]):
            label = "idle (finished warps)"
        else:
            label = "setup"
        out.append((label, a, b))
    return out


def summarise(instructions: list) -> dict:
    total = sum(n for _, n, _ in instructions)
    all_kinds = kinds_of(instructions)
    parts = []
    for label, a, b in partitions(instructions, all_kinds):
        seg = instructions[a:b]
        samples = sum(n for _, n, _ in seg)
        if samples < 0.01 * total:
            continue
        kinds = collections.Counter()
        for (_, n, _), k in zip(seg, all_kinds[a:b]):
            kinds[k] += n
        part = dict(label=label, first=a, end=b, samples=samples, share=samples / total,
                    kinds={k: v / samples for k, v in kinds.most_common()})
        if label == "compute":
            counts = collections.Counter(e for _, _, e in seg if e > 0)
            per_item = min(e for e, c in counts.items() if c >= 0.1 * max(counts.values()))
            item_samples = sum(n for _, n, e in seg if 0 < e <= 1.5 * per_item)
            part.update(per_item_executions=per_item, per_item_share=item_samples / samples)
        part["top"] = [dict(index=a + i, sass=s, samples=n, executed=e)
                       for i, (s, n, e) in sorted(enumerate(seg), key=lambda x: -x[1][1])[:8]]
        parts.append(part)
    return dict(samples=total, partitions=parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="ncu --page source --print-source sass --csv output (.csv or .csv.gz)")
    p.add_argument("--kernel", default="_block_sparse_fwd_sm90_wsp", help="substring of the kernel names to report")
    p.add_argument("--out", help="write the summary as JSON here")
    args = p.parse_args(argv)
    report = []
    for name, instructions in read_kernels(args.csv):
        if args.kernel not in name:
            continue
        summary = summarise(instructions)
        report.append(dict(kernel=name, **summary))
        print(f"\n## launch {len(report)}: {name[:60]} ({summary['samples']} samples)\n")
        print("| partition | SASS lines | share of samples | per-item share | top kinds (share of the partition) |")
        print("|---|---|---|---|---|")
        for part in summary["partitions"]:
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in list(part["kinds"].items())[:6])
            item = f"{part['per_item_share']:.0%}" if "per_item_share" in part else "-"
            print(f"| {part['label']} | {part['first']}-{part['end']} | {part['share']:.1%} | {item} | {kinds} |")
    if not report:
        raise SystemExit(f"no kernel named like {args.kernel!r} in {args.csv}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
