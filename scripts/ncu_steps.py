#!/usr/bin/env python3
"""Summarize an ncu CSV of decode steps (TestDecodeProfile under
ncu --profile-from-start off --csv --metrics gpu__time_duration.sum).

Usage: ncu_steps.py CSV LABEL... -- one label per step, in order (a step
starts at each `embed` kernel). Prints, per step, the kernel time total
and the kernels grouped by name and grid, largest first.
"""
import csv
import sys
from collections import defaultdict


def short(name):
    n = name.split("(")[0]
    for p in ("void ", "cutlass::"):
        n = n.replace(p, "")
    return n[:72]


def main():
    path, labels = sys.argv[1], sys.argv[2:]
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "nsecond")
        us = v / 1000 if unit.startswith("n") else (v if unit.startswith("u") else v * 1000)
        rows.append((r["Kernel Name"], r.get("Grid Size", ""), us))
    steps = []
    for name, grid, us in rows:
        if short(name) == "embed" or not steps:
            steps.append([])
        steps[-1].append((name, grid, us))
    for i, st in enumerate(steps):
        label = labels[i] if i < len(labels) else f"step {i}"
        total = sum(u for _, _, u in st)
        print(f"PROFILE {label}: {len(st)} kernels, {total/1000:.3f} ms kernel time")
        g = defaultdict(lambda: [0, 0.0])
        for name, grid, us in st:
            k = (short(name), grid)
            g[k][0] += 1
            g[k][1] += us
        for (n, grid), (cnt, us) in sorted(g.items(), key=lambda x: -x[1][1])[:16]:
            print(f"PROFILE   {us/1000:8.3f} ms {100*us/total:5.1f}%  {cnt:4d} x {us/cnt:8.2f} us  {n} grid{grid}")


if __name__ == "__main__":
    main()
