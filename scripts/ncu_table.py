#!/usr/bin/env python3
"""ncu_table.py RAW.csv: one line per kernel launch from an `ncu --csv --page
raw` report (--set full): duration, launch shape, DRAM and L2 traffic,
occupancy, and the largest warp stall reasons."""
import csv
import sys

COLS = [  # (label, metric, scale)
    ("us", "gpu__time_duration.sum", 1e-3),
    ("grid", "launch__grid_size", 1),
    ("block", "launch__block_size", 1),
    ("regs", "launch__registers_per_thread", 1),
    ("smem_KB", "launch__shared_mem_per_block", 1 / 1024),
    ("dramR_MB", "dram__bytes_read.sum", 1e-6),
    ("dramW_MB", "dram__bytes_write.sum", 1e-6),
    ("dram%", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("L2hit%", "lts__t_sector_hit_rate.pct", 1),
    ("L2%", "lts__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("sm%", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("occ%", "sm__warps_active.avg.pct_of_peak_sustained_active", 1),
    ("waves", "launch__waves_per_multiprocessor", 1),
]
STALL = "smsp__average_warp_latency_issue_stalled_"
STALL2 = "smsp__pcsamp_warps_issue_stalled_"


def num(v):
    try:
        return float(v.replace(",", ""))
    except (ValueError, AttributeError):
        return None


def main(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    names = rows[head]
    data = [r for r in rows[head + 1:] if r and r[0].strip('"').isdigit()]
    idx = {n: i for i, n in enumerate(names)}
    kn = idx["Kernel Name"]
    print("%-4s %-28s " % ("id", "kernel") + " ".join("%9s" % c[0] for c in COLS) + "  top stalls (share of sampled warp stalls)")
    for r in data:
        vals = []
        for _, m, sc in COLS:
            v = num(r[idx[m]]) if m in idx else None
            vals.append("%9s" % ("-" if v is None else "%.1f" % (v * sc)))
        st = {}
        for n, i in idx.items():
            if n.startswith(STALL2) and not n.endswith("_not_issued") and "." not in n[len(STALL2):]:
                v = num(r[i])
                if v:
                    st[n[len(STALL2):]] = v
        tot = sum(st.values()) or 1
        top = sorted(st.items(), key=lambda kv: -kv[1])[:4]
        name = r[kn].split("(")[0][:28]
        print("%-4s %-28s " % (r[0], name) + " ".join(vals) + "  " + ", ".join("%s %.0f%%" % (k, 100 * v / tot) for k, v in top))


if __name__ == "__main__":
    main(sys.argv[1])
