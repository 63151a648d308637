#!/usr/bin/env python3
"""How each CUDA graph launch of a serving run overlaps its own GPU work,
from nsys's cuda_api_trace and cuda_gpu_trace CSVs (nsys stats --format csv):
per cuGraphLaunch, the API call's duration, the delay from the call's start
to the graph's first GPU operation, and how much of the call was over
before the GPU started (the launch's exposed share, which device time
measured from an event recorded before the launch includes).

Usage: nsys_launch.py API_TRACE.csv GPU_TRACE.csv
"""
import csv
import sys


def rows(path):
    with open(path, newline="") as f:
        lines = [l for l in f if l.strip() and not l.startswith("Processing") and not l.startswith("NOTICE")]
    return list(csv.DictReader(lines))


def col(r, *names):
    for n in names:
        if n in r and r[n] not in ("", None):
            return r[n]
    return None


def main():
    launches = {}
    for r in rows(sys.argv[1]):
        if "cuGraphLaunch" not in (col(r, "Name") or ""):
            continue
        cid, s, d = col(r, "CorrID", "CorrId"), col(r, "Start (ns)"), col(r, "Duration (ns)")
        if cid is None or s is None or d is None:
            continue
        launches[cid] = [float(s), float(d), None, None, 0]
    if not launches:
        print("NSYSLAUNCH no cuGraphLaunch calls in the trace")
        return
    for r in rows(sys.argv[2]):
        cid = col(r, "CorrId", "CorrID")
        if cid not in launches:
            continue
        s, d = col(r, "Start (ns)"), col(r, "Duration (ns)")
        if s is None or d is None:
            continue
        s, d = float(s), float(d)
        l = launches[cid]
        l[2] = s if l[2] is None else min(l[2], s)
        l[3] = s + d if l[3] is None else max(l[3], s + d)
        l[4] += 1
    got = [l for l in launches.values() if l[2] is not None]
    if not got:
        print(f"NSYSLAUNCH {len(launches)} graph launches, none matched to GPU work by correlation id")
        return
    def med(v):
        v = sorted(v)
        return v[len(v) // 2]
    api = [l[1] / 1e3 for l in got]
    first = [(l[2] - l[0]) / 1e3 for l in got]
    exposed = [max(0.0, min(l[2], l[0] + l[1]) - l[0]) / 1e3 for l in got]
    span = [(l[3] - l[2]) / 1e3 for l in got]
    nodes = [l[4] for l in got]
    print(f"NSYSLAUNCH graph launches {len(got)}: API call median {med(api):.0f} us (max {max(api):.0f}); "
          f"call start -> first GPU op median {med(first):.0f} us; GPU ops per launch median {med(nodes)}; "
          f"graph GPU span median {med(span):.0f} us")
    print(f"NSYSLAUNCH first GPU op before the call returned in {sum(1 for l in got if l[2] < l[0] + l[1])} of {len(got)} launches; "
          f"median exposed launch (call start -> first op, within the call) {med(exposed):.0f} us")


if __name__ == "__main__":
    main()
