"""Per case: minimum over rounds of the per-round minima, before (before_r*.json, topk_before_r*.json) and after;
prints comparison.txt.  python compare.py DIR"""
import json, glob, os, sys
B = sys.argv[1]
def load(pattern, key):
    out = {}
    for f in sorted(glob.glob(os.path.join(B, pattern))):
        d = json.load(open(f))
        for m in d["measurements"]:
            out.setdefault(key(m), []).append(m["min_ms"])
    return out
dk = lambda m: f"dense {m['n']}x{m['c']} {m['dtype']} {m['mode']}"
tk = lambda m: f"topk  {m['n']}x{m['c']} k={m['k']} {m['dtype']} {m['mode']}"
for name, pb, pa, key in (("dense", "before_r*.json", "after_r*.json", dk), ("topk", "topk_before_r*.json", "topk_after_r*.json", tk)):
    b, a = load(pb, key), load(pa, key)
    print(f"{'case':48} {'before min over rounds':>22} {'after':>10} {'after/before':>12}   (per-round minima before | after)")
    for k in b:
        print(f"{k:48} {min(b[k]):22.2f} {min(a[k]):10.2f} {min(a[k])/min(b[k]):12.3f}   "
              f"{' '.join(f'{x:.2f}' for x in b[k])} | {' '.join(f'{x:.2f}' for x in a[k])}")
