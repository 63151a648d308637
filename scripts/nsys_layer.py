#!/usr/bin/env python3
"""One layer of one recorded step, every stream, from an nsys
cuda_gpu_trace CSV (gpu-check's nsysdec leaves it gzipped as
nsysdec_cuda_gpu_trace.csv.gz in its logs; gunzip it first); and, over
every step, the gap before each cuBLASLt product and what precedes it.
Run here on a fetched trace, not on the device.

  nsys_layer.py TRACE.csv [lora 0|1] [layer N] [steps all|decode|mixed]

lora 1 (default) picks a step with kernels on a second stream (the LoRA
stream), 0 one without; the step is one from the trace's second half.
The timeline prints start and end (µs from the step's embed), duration,
stream, kernel, grid and registers a thread, and for the compute stream's
kernels (the embed's stream) what each adds: its end minus the latest end
before it on that stream (PERFORMANCE v0.44-v0.45's per-layer chains).
The added table sums that per kernel family over each step of the kind
picked, medians over the steps. steps decode keeps only steps with no
prompt in them (no attn_prefill: a base decode trace's prefill steps
otherwise join its "without a second stream" medians), mixed only steps
with decode and prompt rows (attn_decode and attn_prefill); all (default)
every step. A step has LoRA (lora 1) when its kernels use more than one
stream or it has a LoRA shrink or expand; a kernel is the compute chain's
when it is on the embed's stream or is not a LoRA shrink, expand or
fill_rows (nsys may give a recording's nodes of one stream several). The gap table groups every
cuBLASLt product (nvjet*) by (LoRA step?, the kernel before it on its
stream, its grid) with the median gap from that kernel's end to its start,
and lists the memset nodes with the kernels around them (PERFORMANCE
v0.42: a memset node before a product cost 6 µs, 21 with adapters).
"""
import statistics
import sys
from collections import Counter, defaultdict

from nsys_busy import trace_rows


def load(path):
    rows = []
    for r in trace_rows(path):
        n = r.get("Name", "")
        rows.append((r["start"], r["dur"], n.split("(")[0].strip()[:52], r.get("Strm", ""),
                     r.get("GrdX", ""), r.get("GrdY", ""), r.get("GrdZ", ""), r.get("Reg/Trd", "")))
    rows.sort()
    return rows


def lora_kernel(name):
    """A LoRA kernel by its name (the shrinks and expands the LoRA stream
    runs; rope_store_lora and silu_mul_fold are the compute stream's)."""
    return name.startswith(("sgmv_", "lora_shrink", "lora_expand"))


def compute(k, strm):
    """Whether kernel k is on the step's compute chain: on the embed's
    stream, or any stream's kernel that is not a LoRA kernel nor
    memsethoist.go's fill_rows (nsys may put a recorded graph's nodes of one
    stream on several: a mixed-step trace had add_rmsnorm on the stream of
    the LoRA shrinks before it, v0.84)."""
    if "[CUDA mem" in k[2]:
        return False
    return k[3] == strm or not (lora_kernel(k[2]) or k[2].startswith("fill_rows"))


def steps(rows, kind="all"):
    emb = [i for i, r in enumerate(rows) if r[2].startswith("embed")]
    for j in range(len(emb) - 1):
        ks = rows[emb[j]:emb[j + 1]]
        pre = any(k[2].startswith("attn_prefill") for k in ks)
        dec = any(k[2].startswith("attn_decode") for k in ks)
        if kind == "decode" and pre or kind == "mixed" and not (pre and dec):
            continue
        # fill_rows (memsethoist.go's node for cuBLASLt's memset) runs on
        # a stream of its own in base steps too: not the LoRA stream
        kern = [k for k in ks if "[CUDA mem" not in k[2] and not k[2].startswith("fill_rows")]
        yield ks, len({k[3] for k in kern}) > 1 or any(lora_kernel(k[2]) for k in kern)


def timeline(rows, lora, layer, kind):
    all_steps = list(steps(rows, kind))
    pick = [ks for ks, side in all_steps[len(all_steps) // 2:] if side == lora]
    if not pick:
        print(f"no step {'with' if lora else 'without'} a second stream in the trace's second half")
        return
    ks = pick[0]
    t0, strm = ks[0][0], ks[0][3]
    att = [i for i, k in enumerate(ks) if k[2].startswith("attn_decode")]
    if layer + 1 >= len(att):
        print(f"the step has {len(att)} attn_decode kernels: no layer {layer}")
        return
    first = att[layer] - 2
    prev = max((k[0] + k[1] for k in ks[:first] if compute(k, strm)), default=t0)
    for k in ks[first:att[layer + 1] + 2]:
        add = ""
        if compute(k, strm):
            add = f" added {(k[0] + k[1] - prev) / 1e3:6.1f}"
            prev = max(prev, k[0] + k[1])
        print(f"{(k[0]-t0)/1e3:9.1f} {(k[0]+k[1]-t0)/1e3:9.1f} {k[1]/1e3:6.1f} s{k[3]:>3} {k[2]:52s} g={k[4]},{k[5]},{k[6]} r={k[7]}{add}")


def added(rows, lora, kind):
    """Per kernel family, the compute stream's added time summed over a
    step, median over the steps of the kind picked (µs), and the step's
    span (embed's start to the compute stream's last end)."""
    fam = defaultdict(list)
    spans = []
    n = 0
    for ks, side in steps(rows, kind):
        if side != lora:
            continue
        n += 1
        strm, prev = ks[0][3], ks[0][0]
        f = defaultdict(float)
        for k in ks:
            if not compute(k, strm):
                continue
            f[k[2][:40]] += (k[0] + k[1] - prev) / 1e3
            prev = max(prev, k[0] + k[1])
        for name, v in f.items():
            fam[name].append(v)
        spans.append((prev - ks[0][0]) / 1e3)
    if not n:
        return
    print(f"added time a step by kernel family, median of {n} steps ({kind}) {'with' if lora else 'without'} a second stream (µs); step span median {statistics.median(spans):.1f}")
    total = 0.0
    for name, v in sorted(fam.items(), key=lambda x: -statistics.median(x[1])):
        m = statistics.median(v)
        total += m
        print(f"  {name:40s} {m:9.1f}")
    print(f"  {'total':40s} {total:9.1f}")


def gaps(rows):
    prod = defaultdict(list)
    ms = Counter()
    for ks, side in steps(rows):
        strm = ks[0][3]
        comp = [k for k in ks if compute(k, strm)]
        for a, b in zip(comp, comp[1:]):
            if b[2].startswith("nvjet"):
                prod[(side, a[2][:16], f"{b[4]}x{b[5]}")].append(((b[0] - a[0] - a[1]) / 1e3, b[1] / 1e3))
        for i, k in enumerate(ks):
            if "memset" in k[2]:
                after = [x for x in ks[i + 1:] if x[3] == k[3] and "[CUDA mem" not in x[2]]
                before = [x for x in ks[:i] if x[3] == k[3] and "[CUDA mem" not in x[2]]
                if after and before:
                    ms[(ks[0][4], side, before[-1][2][:16], after[0][2][:44])] += 1
    print("gap before each cuBLASLt product: (LoRA step, kernel before, grid) count, gap median / p10 / p90 µs, product median µs")
    for key, v in sorted(prod.items()):
        g = sorted(x[0] for x in v)
        print(f"  {key} {len(v)}  {statistics.median(g):.1f} / {g[len(g)//10]:.1f} / {g[9*len(g)//10]:.1f}  {statistics.median(x[1] for x in v):.1f}")
    print("memset nodes: count (step rows, LoRA step, kernel before, kernel after)")
    for key, n in ms.most_common(12):
        print(f"  {n} {key}")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rows = load(sys.argv[1])
    lora = sys.argv[2] != "0" if len(sys.argv) > 2 else True
    layer = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    kind = sys.argv[4] if len(sys.argv) > 4 else "all"
    if kind not in ("all", "decode", "mixed"):
        sys.exit(f"steps must be all, decode or mixed, not {kind!r}")
    timeline(rows, lora, layer, kind)
    print()
    added(rows, lora, kind)
    print()
    gaps(rows)


if __name__ == "__main__":
    main()
