#!/usr/bin/env python3
"""What the GPU as a whole was doing under each kernel of a decode step:
nsys's GPU metrics (sampled device-wide, `--gpu-metrics-devices`) averaged
over the compute-stream kernels of TestDecodeBench's steps (gpu-check's
nsysdec with NSYSDEC_METRICS=1).

A kernel's row holds the mean of each metric's samples whose timestamp
falls inside one of that family's kernels, over the steps of one graph
(nsys_steps.py's grouping: batch, "+lora" for steps with the LoRA
stream's kernels, NSYS_STEPS_MIXED=1 for steps with a prompt). Under a
compute-stream product of a LoRA step the samples include the LoRA
stream's kernels beside it: the point is to compare the same product's
DRAM read / write throughput, SMs active and tensor activity with and
without the LoRA stream (is the pair bandwidth-bound or latency-bound?).

The metrics are percentages of peak as nsys reports them (its names
carry "[Throughput %]"); a sample covers the sampling period before its
timestamp, so kernels shorter than a period (5 us at 200 kHz) get few
samples, and the count is printed.

Usage: nsys_metrics.py TRACE.csv REPORT.sqlite
       nsys_metrics.py --selftest
"""
import bisect
import os
import sqlite3
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nsys_steps import beside, label, load, lora_step, steps_of  # noqa: E402

# The metrics printed (a column key, a piece of nsys's name), in this
# order; every metric in the report is listed once by its full name.
COLUMNS = (
    ("dram_rd", "DRAM Read"),
    ("dram_wr", "DRAM Write"),
    ("sms_act", "SMs Active"),
    ("sm_issue", "SM Issue"),
    ("tensor", "Tensor Active"),
    ("warps", "Compute Warps in Flight"),
)


def metric_samples(db, t0=None, t1=None):
    """({column key: (sorted timestamps, values)} for COLUMNS' metrics found
    (the first full name holding the piece), every metric name) from the
    report's GPU_METRICS, samples from t0 to t1 where given (a 200 kHz
    capture of several seconds holds millions of rows a metric: only what
    the tables use is read), or (None, reason) where the report has none."""
    con = sqlite3.connect(db)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    need = {"GPU_METRICS", "TARGET_INFO_GPU_METRICS"}
    if not need <= tables:
        con.close()
        return None, f"no GPU metrics in {db}: tables {sorted(need - tables)} missing"
    ids = defaultdict(list)  # name -> [(typeId, metricId)]
    for type_id, metric_id, name in con.execute("SELECT DISTINCT typeId, metricId, metricName FROM TARGET_INFO_GPU_METRICS"):
        ids[name].append((type_id, metric_id))
    out = {}
    for key, piece in COLUMNS:
        found = sorted(n for n in ids if piece.lower() in n.lower())
        if not found:
            continue
        xs = []
        for type_id, metric_id in ids[found[0]]:
            q = "SELECT timestamp, value FROM GPU_METRICS WHERE typeId = ? AND metricId = ?"
            args = [type_id, metric_id]
            if t0 is not None and t1 is not None:
                q += " AND timestamp BETWEEN ? AND ?"
                args += [int(t0), int(t1)]
            xs.extend((ts, float(v)) for ts, v in con.execute(q, args) if v is not None)
        xs.sort()
        out[key] = ([t for t, _ in xs], [v for _, v in xs])
    con.close()
    return out, sorted(ids)


def kernel_offset(db, rows):
    """The report's kernel start minus the trace CSV's for the first kernel:
    both are nsys session time, so 0 is expected; a nonzero offset is
    applied to the samples and printed."""
    con = sqlite3.connect(db)
    try:
        r = con.execute("SELECT MIN(start) FROM CUPTI_ACTIVITY_KIND_KERNEL").fetchone()
    except sqlite3.Error:
        r = None
    con.close()
    if not r or r[0] is None or not rows:
        return 0.0
    return float(r[0]) - rows[0][0]


def window(ts, vals, a, b):
    """The values of the samples with a timestamp in [a, b]."""
    i, j = bisect.bisect_left(ts, a), bisect.bisect_right(ts, b)
    return vals[i:j]


def tables(rows, metrics, offset=0.0):
    """Lines of the per-family tables: for each step group, each compute-stream
    kernel family's mean of each column's metric under it, and the step's."""
    groups = defaultdict(list)
    for batch, _strm, ks in steps_of(rows):
        groups[(batch, lora_step(ks))].append(ks)
    lines = []
    for key in sorted(groups):
        steps = groups[key][3:]  # warm-up steps left out, as nsys_steps.py does
        if not steps:
            continue
        batch = f"{key[0]}{'+lora' if key[1] else ''}"
        fam = defaultdict(lambda: defaultdict(list))  # family -> column -> values
        whole = defaultdict(list)
        durs = defaultdict(list)
        spans = []
        for ks in steps:
            t0 = ks[0][0] + offset
            t1 = max(k[0] + k[1] for k in ks) + offset
            spans.append(t1 - t0)
            for ckey, m in metrics.items():
                whole[ckey].extend(window(*m, t0, t1))
            for k in ks:
                if beside(k):
                    continue
                durs[label(k)].append(k[1])
                a, b = k[0] + offset, k[0] + k[1] + offset
                for ckey, m in metrics.items():
                    fam[label(k)][ckey].extend(window(*m, a, b))
        head = " ".join(f"{c:>8}" for c, _ in COLUMNS)
        lines.append(f"NSYSMET batch {batch}: {len(steps)} steps; mean % of peak over the samples under each compute-stream family")
        lines.append(f"NSYSMET batch {batch}   {'samples':>7} {'us each':>8} {head}  family")

        def row(n, each, vals, name):
            cells = " ".join(f"{statistics.fmean(vals[c]):8.1f}" if vals.get(c) else f"{'-':>8}" for c, _ in COLUMNS)
            return f"NSYSMET batch {batch}   {n:7d} {each:8.2f} {cells}  {name}"

        n_whole = max((len(v) for v in whole.values()), default=0)
        lines.append(row(n_whole, statistics.median(spans) / 1e3, whole, "(whole step)"))
        order = sorted(fam, key=lambda f: -sum(durs[f]))
        for f in order:
            n = max((len(v) for v in fam[f].values()), default=0)
            lines.append(row(n, statistics.median(durs[f]) / 1e3, fam[f], f))
    return lines


def main(argv):
    if argv[1:] == ["--selftest"]:
        return selftest()
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-2].strip(), file=sys.stderr)
        return 2
    rows = load(argv[1])
    if not rows:
        print("NSYSMET no kernels in the trace")
        return 0
    off = kernel_offset(argv[2], rows)
    if off:
        print(f"NSYSMET the report's kernel times are {off:.0f} ns from the trace CSV's: samples shifted")
    t1 = max(r[0] + r[1] for r in rows)
    metrics, names = metric_samples(argv[2], rows[0][0] + off, t1 + off)
    if metrics is None:
        print(f"NSYSMET {names}")
        return 0
    print(f"NSYSMET metrics in the report: {', '.join(names)}")
    if not any(ts for ts, _ in metrics.values()):
        print("NSYSMET no samples of the tables' metrics inside the trace")
        return 0
    for line in tables(rows, metrics, off):
        print(line)
    return 0


def selftest():
    """Eight steps of made-up kernels and samples, the last four with a LoRA
    kernel: each family's mean must be the mean of the samples inside its
    kernels only (the first three steps of each group are left out)."""
    import csv
    import tempfile

    d = tempfile.mkdtemp()
    trace = os.path.join(d, "t.csv")
    # embed (0-10 us), gemm (10-60), silu (60-70); eight steps 100 us
    # apart, the last four with a LoRA kernel beside the gemm
    with open(trace, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Start (ns)", "Duration (ns)", "Name", "Strm", "GrdX", "GrdY", "GrdZ"])
        for s in range(8):
            t = s * 100_000
            w.writerow([t, 10_000, "embed", 7, 64, 1, 1])
            w.writerow([t + 10_000, 50_000, "nvjet_tst_128x128", 7, 112, 1, 1])
            if s >= 4:
                w.writerow([t + 12_000, 40_000, "sgmv_expand_tch1s", 9, 840, 1, 1])
            w.writerow([t + 60_000, 10_000, "silu_mul_o2h", 7, 240, 1, 1])
    db = os.path.join(d, "r.sqlite")
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE TARGET_INFO_GPU_METRICS (typeId INT, sourceId INT, typeName TEXT, metricId INT, metricName TEXT)")
    con.execute("CREATE TABLE GPU_METRICS (timestamp INT, typeId INT, metricId INT, value INT)")
    con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INT, end INT)")
    con.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (0, 10000)")
    con.execute("INSERT INTO TARGET_INFO_GPU_METRICS VALUES (1, 0, 'gh100', 5, 'DRAM Read Bandwidth [Throughput %]')")
    con.execute("INSERT INTO TARGET_INFO_GPU_METRICS VALUES (1, 0, 'gh100', 6, 'SMs Active [Throughput %]')")
    for t in range(2_500, 800_000, 5_000):  # off the kernels' edges
        phase = t % 100_000
        lora = t >= 400_000
        rd = 90 if 10_000 <= phase <= 60_000 else 20  # the gemm's samples (both edges inside it)
        if lora and 10_000 <= phase <= 60_000:
            rd = 95
        con.execute("INSERT INTO GPU_METRICS VALUES (?, 1, 5, ?)", (t, rd))
        con.execute("INSERT INTO GPU_METRICS VALUES (?, 1, 6, ?)", (t, 100 if phase < 70_000 else 0))
    con.commit()
    con.close()
    metrics, names = metric_samples(db)
    assert metrics is not None, names
    assert names == ["DRAM Read Bandwidth [Throughput %]", "SMs Active [Throughput %]"], names
    assert sorted(metrics) == ["dram_rd", "sms_act"], sorted(metrics)
    part, _ = metric_samples(db, 100_000, 199_999)
    assert len(part["dram_rd"][0]) == 20, part
    assert kernel_offset(db, load(trace)) == 0.0
    lines = tables(load(trace), metrics)
    # a trace CSV whose clock is 1 us behind the report's: the offset found
    # and applied gives the same tables
    behind = [(r[0] - 1_000,) + r[1:] for r in load(trace)]
    off = kernel_offset(db, behind)
    assert off == 1_000.0, off
    assert tables(behind, metrics, off) == lines
    got = {}
    for line in lines:
        parts = line.split()
        if len(parts) > 11 and parts[3].isdigit() and not parts[2].endswith(":"):
            got[(parts[2], " ".join(parts[11:]))] = (float(parts[5]), parts[8])
    # batch key: embed's grid x (64); the first three steps of each group are warm-up
    base, lora = got[("64", "gemm nvjet_tst_128x128 [grid 112x1x1]")], got[("64+lora", "gemm nvjet_tst_128x128 [grid 112x1x1]")]
    assert base[0] == 90.0, base
    assert lora[0] == 95.0, lora
    assert got[("64", "silu_mul_o2h")][0] == 20.0, got
    assert abs(got[("64+lora", "(whole step)")][0] - (10 * 95 + 4 * 20) / 14) < 0.05, got  # 2.5-67.5 us: two embed, ten gemm, two silu samples
    assert base[1] == "-", base  # a column with no metric prints '-'
    print("nsys_metrics selftest: ok")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
