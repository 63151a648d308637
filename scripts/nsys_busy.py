#!/usr/bin/env python3
"""Summarize an nsys cuda_gpu_trace CSV (nsys stats --report cuda_gpu_trace
--format csv) of a serving run: how busy the GPU was between the first and
the last kernel, how long the gaps between kernels were, and the kernels
that took the most time.

Usage: nsys_busy.py TRACE.csv
"""
import csv
import sys
from collections import defaultdict


def trace_rows(path):
    """The records of an nsys cuda_gpu_trace CSV (nsys's progress lines left
    out) that have a start and a duration: the CSV's dicts, with "start" and
    "dur" (ns) added. nsys_steps.py reads its traces with it too."""
    with open(path, newline="") as f:
        lines = [l for l in f if l.strip() and not l.startswith("Processing") and not l.startswith("NOTICE")]
    for r in csv.DictReader(lines):
        try:
            r["start"], r["dur"] = float(r["Start (ns)"]), float(r["Duration (ns)"])
        except (KeyError, ValueError):
            continue
        yield r


def main():
    rows = []
    for r in trace_rows(sys.argv[1]):
        name = r.get("Name", "")
        if "[CUDA mem" in name:  # copies and memsets: listed apart
            name = name.strip()
        rows.append((r["start"], r["dur"], name, r.get("Strm", "")))
    if not rows:
        print("NSYS no GPU work in the trace")
        return
    rows.sort()
    t0, t1 = rows[0][0], max(s + d for s, d, _, _ in rows)
    # busy time: the union of the intervals (streams overlap)
    busy, cur_s, cur_e = 0.0, rows[0][0], rows[0][0] + rows[0][1]
    gaps = []
    for s, d, _, _ in rows[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, s + d
        else:
            cur_e = max(cur_e, s + d)
    busy += cur_e - cur_s
    span = t1 - t0
    gaps.sort()
    def pct(p):
        return gaps[min(len(gaps) - 1, int(p * len(gaps)))] / 1e3 if gaps else 0.0
    print(f"NSYS span {span/1e6:.1f} ms, GPU busy {busy/1e6:.1f} ms ({100*busy/span:.1f}%), {len(rows)} GPU operations on {len({r[3] for r in rows})} streams")
    print(f"NSYS idle gaps: {len(gaps)}, total {sum(gaps)/1e6:.1f} ms; p50 {pct(.5):.1f} us, p90 {pct(.9):.1f} us, p99 {pct(.99):.1f} us, max {gaps[-1]/1e3 if gaps else 0:.0f} us")
    big = [g for g in gaps if g > 100e3]
    print(f"NSYS gaps over 100 us: {len(big)}, {sum(big)/1e6:.1f} ms of idle")
    by = defaultdict(lambda: [0, 0.0])
    for _, d, n, _ in rows:
        k = n.split("(")[0][:70]
        by[k][0] += 1
        by[k][1] += d
    tot = sum(v[1] for v in by.values())
    for k, (c, d) in sorted(by.items(), key=lambda x: -x[1][1])[:14]:
        print(f"NSYS   {d/1e6:9.2f} ms {100*d/tot:5.1f}% {c:7d} x {d/c/1e3:8.2f} us  {k}")


if __name__ == "__main__":
    main()
