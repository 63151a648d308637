#!/usr/bin/env python3
"""Where a decode step's time goes inside its CUDA graph, from an nsys
cuda_gpu_trace CSV (nsys stats --report cuda_gpu_trace --format csv) of
TestDecodeBench traced with --cuda-graph-trace=node (gpu-check's nsysdec).

A step starts at its `embed` kernel; its batch is embed's grid X. Steps
with prefill attention (attn_prefill, the per-row `attention` kernel) are
left out (kept with NSYS_STEPS_MIXED=1: TestDecodeBench's
PEFTD_DECODE_MIXED steps, a prompt beside the decode rows), and the first
3 decode steps of each batch too. Steps of one
batch replay one graph, so their kernels line up by index on the compute
stream (embed's); for each kernel family the table gives the kernels per
step, their median duration, and the median gap before each: its start
minus the latest end of the compute-stream kernels before it (negative:
it started under the one before, as Programmatic Dependent Launch allows).
The step span is the first start to the last end of the step's kernels.
Steps with the LoRA stream's kernels (told by name: BESIDE; 4 x r32 rows,
with nsysdec's NSYSDEC_VARIANTS=2) form their own table, keyed "+lora",
and also list those kernels: per family, the count per step, the median
duration each and their time summed over the step.

Usage: nsys_steps.py TRACE.csv
"""
import os
import statistics
import sys
from collections import defaultdict

from nsys_busy import trace_rows


def family(name):
    n = name.split("(")[0].strip()
    if n.startswith("void "):
        n = n[5:]
    if n.startswith("nvjet"):
        return "gemm " + n  # cuBLASLt's kernel: its tile names the shape
    if "splitKreduce" in n:
        return "cublasLt splitKreduce"
    return n.split("<")[0][:60]


def label(k):
    """A kernel's row in the tables: its family, and for a cuBLASLt product
    its grid too (one kernel name can serve several projections: q/k/v and
    gate/up share one at 256 FP8 rows, and their durations differ 4x)."""
    f = family(k[2])
    return f"{f} [grid {k[5]}]" if f.startswith("gemm ") else f


def load(path):
    """The trace's kernels (copies and memsets left out), by start:
    (start, duration, name, stream, grid x, grid "XxYxZ")."""
    rows = []
    for r in trace_rows(path):
        name = r.get("Name", "")
        if "[CUDA mem" in name:
            continue
        try:
            gx = int(float(r.get("GrdX", "0") or 0))
        except ValueError:
            gx = 0
        grid = "x".join(str(r.get(c, "")).split(".")[0] for c in ("GrdX", "GrdY", "GrdZ"))
        rows.append((r["start"], r["dur"], name, r.get("Strm", ""), gx, grid))
    rows.sort()
    return rows


MIXED = os.environ.get("NSYS_STEPS_MIXED") == "1"

# Kernels off the compute stream's chain, by name: nsys reports a graph's
# nodes on the streams the graph executor maps them to, and a recording
# whose cuBLASLt memsets became fill_rows nodes (memsethoist.go) has its
# compute chain over several of them.
BESIDE = ("sgmv_", "lora_shrink", "lora_expand", "fill_rows")


def beside(k):
    return family(k[2]).startswith(BESIDE)


def lora_step(ks):
    """Whether a step's kernels include the LoRA stream's (fill_rows, beside
    the compute chain in every recording, does not count)."""
    return any(beside(k) and not family(k[2]).startswith("fill_rows") for k in ks)


def steps_of(rows):
    """Splits the trace at each embed kernel: (batch, compute stream, kernels)."""
    starts = [i for i, r in enumerate(rows) if family(r[2]) == "embed"]
    out = []
    for j, i in enumerate(starts):
        end = starts[j + 1] if j + 1 < len(starts) else len(rows)
        ks = rows[i:end]
        if not MIXED and any(f in ("attn_prefill_d32", "attn_prefill_d64", "attn_prefill_d128", "attention") or f.startswith("attn_prefill") for f in (family(k[2]) for k in ks)):
            continue
        out.append((rows[i][4], rows[i][3], ks))
    return out


def main():
    rows = load(sys.argv[1])
    if not rows:
        print("NSYSDEC no kernels in the trace")
        return
    by_batch = defaultdict(list)
    for batch, strm, ks in steps_of(rows):
        by_batch[(batch, lora_step(ks))].append((strm, ks))
    for key in sorted(by_batch):
        steps = by_batch[key][3:]
        batch = f"{key[0]}{'+lora' if key[1] else ''}"
        # the steps of the most common kernel count (one graph's replays)
        counts = defaultdict(int)
        for strm, ks in steps:
            counts[sum(1 for k in ks if not beside(k))] += 1
        if not counts:  # a batch of three steps or fewer: warm-up only
            continue
        n = max(counts, key=counts.get)
        steps = [(strm, ks) for strm, ks in steps if sum(1 for k in ks if not beside(k)) == n]
        if not steps:
            continue
        spans, sums, gsum = [], [], []
        per = [[] for _ in range(n)]  # (dur, gap) per compute-stream position
        names = [None] * n
        for strm, ks in steps:
            spans.append(max(k[0] + k[1] for k in ks) - ks[0][0])
            comp = [k for k in ks if not beside(k)]
            sums.append(sum(k[1] for k in comp))
            end, g = None, 0.0
            for i, k in enumerate(comp):
                gap = 0.0 if end is None else k[0] - end
                per[i].append((k[1], gap))
                names[i] = label(k)
                g += max(gap, 0.0)
                end = k[0] + k[1] if end is None else max(end, k[0] + k[1])
            gsum.append(g)
        med = statistics.median
        print(f"NSYSDEC batch {batch}: {len(steps)} steps of {n} compute-stream kernels; step span median {med(spans)/1e3:.1f} us, "
              f"kernel time {med(sums)/1e3:.1f} us, idle before kernels {med(gsum)/1e3:.1f} us")
        fam = defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # count, dur, gap, negative gap (overlap)
        trans = defaultdict(float)
        for i in range(n):
            d = med(x[0] for x in per[i])
            g = med(x[1] for x in per[i])
            f = fam[names[i]]
            f[0] += 1
            f[1] += d
            if g > 0:
                f[2] += g
                if i > 0:
                    trans[(names[i - 1], names[i])] += g
            else:
                f[3] += -g
        print(f"NSYSDEC batch {batch}   {'per step':>8} {'dur us':>9} {'idle before us':>15} {'overlap us':>11}  family (median dur each)")
        for name, (c, d, g, o) in sorted(fam.items(), key=lambda x: -(x[1][1] + x[1][2])):
            print(f"NSYSDEC batch {batch}   {c:8d} {d/1e3:9.1f} {g/1e3:15.1f} {o/1e3:11.1f}  {name} ({d/c/1e3:.2f})")
        for (a, b), g in sorted(trans.items(), key=lambda x: -x[1])[:8]:
            print(f"NSYSDEC batch {batch}   idle {g/1e3:8.1f} us per step: {a} -> {b}")
        if key[1]:
            side_table(batch, steps)


def side_table(batch, steps):
    """The kernels of the steps' other streams, by family: count per step,
    median duration each, and summed duration per step (median over steps)."""
    per = defaultdict(list)  # family -> [(count, total dur)] per step
    for strm, ks in steps:
        fam = defaultdict(lambda: [0, 0.0, []])
        for k in ks:
            if beside(k):
                f = fam[label(k)]
                f[0] += 1
                f[1] += k[1]
                f[2].append(k[1])
        for name, (c, d, ds) in fam.items():
            per[name].append((c, d, statistics.median(ds)))
    med = statistics.median
    print(f"NSYSDEC batch {batch}   other streams: {'per step':>8} {'dur us':>9}  family (median dur each)")
    for name, xs in sorted(per.items(), key=lambda x: -med(v[1] for v in x[1])):
        print(f"NSYSDEC batch {batch}   {med(v[0] for v in xs):22.0f} {med(v[1] for v in xs)/1e3:9.1f}  {name} ({med(v[2] for v in xs)/1e3:.2f})")


if __name__ == "__main__":
    main()
