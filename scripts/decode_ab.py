#!/usr/bin/env python3
"""decode_ab.py: the A/B table of TestDecodeBench's rows (BENCH decode lines).

For every batch and every setting suffix (the part of a row's label after
its adapters: "+part16", "+nopdl", "+nopdl+part16", "" for the default),
the base row ("no"+suffix) and the adapters' row ("4xr32"+suffix, or any
NxrR) side by side: device ms a step, the adapters' throughput as a
fraction of the base's in the same setting (issue 9's ratio), and each
row's step time against the default setting's row of the same kind.

    python3 scripts/decode_ab.py decode.txt [more files]

Rows a file lacks are left out; a setting with neither row is not printed.
"""
import re
import sys


def parse(lines):
    """{(batch, kind, suffix): gpu_ms}; kind is "no" or the adapters' label."""
    rows = {}
    for line in lines:
        f = line.split()
        if f[:2] == ["BENCH", "decode"]:
            f = f[2:]  # as TestDecodeBench prints it; without: as gpu-check's summary does
        if len(f) < 9 or not f[0].isdigit():
            continue
        label = f[1]
        m = re.match(r"^(no|\d+xr\d+)(\+.*)?$", label)
        if not m:
            continue
        kind, suffix = m.group(1), m.group(2) or ""
        if label.startswith("no+ds"):
            continue  # sampled on the device: not a base/adapters pair
        try:
            gpu_ms = float(f[7])
        except ValueError:
            continue
        rows[(int(f[0]), kind, suffix)] = gpu_ms
    return rows


def table(rows):
    out = []
    batches = sorted({b for b, _, _ in rows})
    for b in batches:
        kinds = sorted({k for bb, k, _ in rows if bb == b and k != "no"})
        suffixes = sorted({s for bb, _, s in rows if bb == b}, key=lambda s: (s != "", s))
        for ad in kinds or ["-"]:
            out.append(f"batch {b}: base (no) and {ad}; device ms a step")
            out.append(f"  {'setting':<18} {'base_ms':>8} {'lora_ms':>8} {'lora/base':>9} {'base_vs_def':>11} {'lora_vs_def':>11}")
            for s in suffixes:
                base, lora = rows.get((b, "no", s)), rows.get((b, ad, s))
                if base is None and lora is None:
                    continue
                db, dl = rows.get((b, "no", "")), rows.get((b, ad, ""))
                fmt = lambda v: f"{v:8.3f}" if v is not None else f"{'-':>8}"
                ratio = f"{base / lora:9.3f}" if base and lora else f"{'-':>9}"
                vb = f"{base / db:11.3f}" if base and db else f"{'-':>11}"
                vl = f"{lora / dl:11.3f}" if lora and dl else f"{'-':>11}"
                out.append(f"  {s or '(default)':<18} {fmt(base)} {fmt(lora)} {ratio} {vb} {vl}")
    return out


def main(paths):
    lines = []
    for p in paths:
        with open(p) as fh:
            lines += fh.readlines()
    for line in table(parse(lines)):
        print(line)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
