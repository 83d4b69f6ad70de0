#!/usr/bin/env python3
"""compare_bf16_spread.py — how far a bf16 (or any second) golden is from the fp32 golden.

    python3 compare_bf16_spread.py FP32.safetensors BF16.safetensors [--json OUT.json]
                                   [--margin 2.0] [--all]

For every tensor present in both files: float tensors get max |a-b|, max_rel = max|a-b| / max|a|,
rel_l2 = |a-b|_2 / |a|_2 and the cosine of the two (all in float64, from the stored values);
integer tensors (ids, routes) get equal / first differing index.  Tensors that depend on the
generated CoT (reason decode, embed_cot pass, the hard embedding) are compared only when both runs
produced the same cot_ids for that item; otherwise they are listed as "CoT diverged at step k"
(a greedy near-tie in bf16 is expected on a random model).  Tensors of an item whose route
differs are skipped the same way.

The summary groups tensors by family ("gate_hidden.layer*", "gate_final", "e0", ...), takes the
worst value over items, and prints a suggested tolerance = margin x the observed spread; that
spread is what DESIGN.md §7 makes the CUDA bf16 tolerance.  Needs torch + safetensors (the GPU
box has them).  Exit status: 0, or 2 on usage errors / unreadable files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

# Float tensors computed from the generated CoT: compared only when both runs generated the same
# tokens for that item.  The id tensors (cot_gen_ids, cot_ids, ...) are always compared, so the
# divergence shows.  reason_* (the prefill of the reason prompt) only needs the same route.
COT_DEPENDENT = ("cot_margin", "embed_cot_", "embcot_", "e1", "embedding")
_ITEM = re.compile(r"^item\.(\d+)\.(.+)$")


def family(key):
    mo = _ITEM.match(key)
    name = mo.group(2) if mo else key
    return re.sub(r"layer\d+", "layer*", name)


def build_parser():
    ap = argparse.ArgumentParser(description="per-tensor spread between two twn goldens (fp32 vs bf16)")
    ap.add_argument("ref", help="fp32 golden (the reference)")
    ap.add_argument("other", help="bf16 (or other) golden")
    ap.add_argument("--json", help="write the per-tensor and per-family numbers as JSON")
    ap.add_argument("--margin", type=float, default=2.0, help="suggested tolerance = margin x observed (default 2)")
    ap.add_argument("--all", action="store_true", help="print every tensor, not only the family summary")
    return ap


def compare(torch, a, b):
    if a.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        if tuple(a.shape) != tuple(b.shape) or not torch.equal(a, b.to(a.dtype)):
            fa, fb = a.flatten().tolist(), b.flatten().tolist()
            k = next((i for i in range(min(len(fa), len(fb))) if fa[i] != fb[i]), min(len(fa), len(fb)))
            return {"kind": "int", "equal": False, "first_diff": k, "len": [len(fa), len(fb)]}
        return {"kind": "int", "equal": True}
    if tuple(a.shape) != tuple(b.shape):
        return {"kind": "float", "shape_mismatch": [list(a.shape), list(b.shape)]}
    x, y = a.double().flatten(), b.double().flatten()
    if x.numel() == 0:
        return {"kind": "float", "empty": True}
    d = (x - y).abs()
    amax = x.abs().max().item()
    nx, ny = x.norm().item(), y.norm().item()
    cos = (x @ y).item() / (nx * ny) if nx > 0 and ny > 0 else (1.0 if nx == ny else 0.0)
    return {"kind": "float", "max_abs": d.max().item(), "max_rel": d.max().item() / amax if amax > 0 else 0.0,
            "rel_l2": (x - y).norm().item() / nx if nx > 0 else 0.0, "cos": cos,
            "nonfinite": int((~torch.isfinite(y)).sum().item())}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        import torch
        from safetensors import safe_open
    except ImportError as e:
        sys.stderr.write("compare_bf16_spread: needs torch and safetensors (%s)\n" % e)
        return 2

    def load(p):
        with safe_open(p, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})

    try:
        A, ma = load(args.ref)
        B, mb = load(args.other)
    except Exception as e:
        sys.stderr.write("compare_bf16_spread: %s\n" % e)
        return 2
    print("ref   %s: %s %s %s attn=%s mode=%s transformers %s" % (
        args.ref, ma.get("dtype"), ma.get("device"), ma.get("format"), ma.get("attn"), ma.get("mode"),
        ma.get("transformers")))
    print("other %s: %s %s %s attn=%s mode=%s transformers %s" % (
        args.other, mb.get("dtype"), mb.get("device"), mb.get("format"), mb.get("attn"), mb.get("mode"),
        mb.get("transformers")))
    if ma.get("manifest_sha256") != mb.get("manifest_sha256"):
        print("WARNING: the two goldens were made with different twn.json (sha256 %s vs %s)" % (
            ma.get("manifest_sha256"), mb.get("manifest_sha256")))
    if ma.get("items_sha256") != mb.get("items_sha256"):
        print("WARNING: the two goldens were made from different items files")

    # per item: did routes and CoTs agree?
    items = sorted({int(m.group(1)) for k in A for m in [_ITEM.match(k)] if m})
    cot_ok, notes = {}, []
    for i in items:
        ra, rb = A.get("item.%d.route" % i), B.get("item.%d.route" % i)
        if ra is not None and rb is not None and not torch.equal(ra, rb):
            cot_ok[i] = False
            notes.append("item %d: route differs (%d vs %d); hard-path tensors skipped" % (i, ra.item(), rb.item()))
            continue
        ca, cb = A.get("item.%d.cot_gen_ids" % i), B.get("item.%d.cot_gen_ids" % i)
        if ca is None or cb is None:
            cot_ok[i] = ca is None and cb is None
            continue
        r = compare(torch, ca, cb)
        cot_ok[i] = r["equal"]
        if not r["equal"]:
            ma_ = A.get("item.%d.cot_margin" % i)
            k = r["first_diff"]
            marg = ma_[k].item() if ma_ is not None and k < ma_.numel() else float("nan")
            notes.append("item %d: CoT diverged at step %d (fp32 top1-top2 margin there %.4g); "
                         "CoT-dependent tensors skipped" % (i, k, marg))

    rows, fam = {}, {}
    only_a = sorted(set(A) - set(B))
    only_b = sorted(set(B) - set(A))
    for k in sorted(set(A) & set(B), key=lambda s: (family(s), s)):
        mo = _ITEM.match(k)
        if mo:
            i, name = int(mo.group(1)), mo.group(2)
            if name.startswith(COT_DEPENDENT) and not cot_ok.get(i, True):
                continue
        r = compare(torch, A[k], B[k])
        rows[k] = r
        f = family(k)
        agg = fam.setdefault(f, {"n": 0, "kind": r["kind"]})
        agg["n"] += 1
        if r["kind"] == "int":
            agg["unequal"] = agg.get("unequal", 0) + (0 if r["equal"] else 1)
        elif "max_abs" in r:
            for key, worst in (("max_abs", max), ("max_rel", max), ("rel_l2", max), ("cos", min)):
                agg[key] = worst(agg.get(key, r[key]), r[key])
            agg["nonfinite"] = agg.get("nonfinite", 0) + r["nonfinite"]
        elif "shape_mismatch" in r:
            agg["shape_mismatch"] = agg.get("shape_mismatch", 0) + 1

    if args.all:
        print("\n%-48s %12s %12s %12s %14s" % ("tensor", "max_abs", "max_rel", "rel_l2", "1-cos"))
        for k, r in rows.items():
            if r["kind"] == "int":
                print("%-48s %s" % (k, "equal" if r["equal"] else "DIFFER at %d (len %s)" % (r["first_diff"], r["len"])))
            elif "max_abs" in r:
                print("%-48s %12.4g %12.4g %12.4g %14.4g" % (k, r["max_abs"], r["max_rel"], r["rel_l2"], 1 - r["cos"]))
            else:
                print("%-48s %s" % (k, json.dumps(r)))

    print("\nper family (worst over items)       n      max_abs      max_rel       rel_l2          1-cos   "
          "suggested tol (x%g): abs / rel / 1-cos" % args.margin)
    for f, agg in sorted(fam.items()):
        if agg["kind"] == "int":
            print("%-32s %5d   ids: %s" % (f, agg["n"], "all equal" if not agg.get("unequal") else
                                          "%d differ" % agg["unequal"]))
        elif "max_abs" in agg:
            mg = args.margin
            print("%-32s %5d %12.4g %12.4g %12.4g %14.4g   %.3g / %.3g / %.3g%s" % (
                f, agg["n"], agg["max_abs"], agg["max_rel"], agg["rel_l2"], 1 - agg["cos"],
                mg * agg["max_abs"], mg * agg["max_rel"], mg * (1 - agg["cos"]),
                "  NONFINITE %d" % agg["nonfinite"] if agg["nonfinite"] else ""))
        else:
            print("%-32s %5d   %s" % (f, agg["n"], json.dumps(agg)))
    for n in notes:
        print("note: " + n)
    if only_a:
        print("only in ref (%d): %s" % (len(only_a), ", ".join(only_a[:12]) + (" ..." if len(only_a) > 12 else "")))
    if only_b:
        print("only in other (%d): %s" % (len(only_b), ", ".join(only_b[:12]) + (" ..." if len(only_b) > 12 else "")))
    if args.json:
        def clean(o):
            if isinstance(o, float) and not math.isfinite(o):
                return str(o)
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items()}
            if isinstance(o, list):
                return [clean(v) for v in o]
            return o
        with open(args.json, "w") as f:
            json.dump(clean({"ref": args.ref, "other": args.other, "ref_meta": {k: ma.get(k) for k in (
                "dtype", "device", "attn", "mode", "transformers", "torch")}, "other_meta": {k: mb.get(k) for k in (
                    "dtype", "device", "attn", "mode", "transformers", "torch")}, "margin": args.margin,
                "families": fam, "tensors": rows, "notes": notes, "only_in_ref": only_a,
                "only_in_other": only_b}), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
