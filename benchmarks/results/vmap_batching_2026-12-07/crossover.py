# The crossover of vmap_rules.SHARED_BYTES_PER_SAMPLE: both forced paths against per-sample calls at 1-8 MB of shared inputs a sample.
# Run from the repository root: PYTHONPATH=$PWD python benchmarks/results/vmap_batching_2026-12-07/crossover.py
import sys, json, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "benchmarks/gpu")
import vmap_batching as vb
torch.set_num_threads(1)
impls = vb.implementations("cpu")
for case in [(8, 64, 2000, True), (8, 64, 4000, True), (8, 64, 8000, True), (8, 64, 16000, True)]:
    rows = [vb.measure(n, impls[n], case, torch.float32, "cpu", 10, 7) for n in ("sample by sample", "vmap, always one call", "vmap, always per sample")]
    base = rows[0]["us_per_call"]
    print(case, "shared bytes/sample", 2*case[1]*case[2]*4, " ".join(f"{r['impl']}={r['us_per_call']/base:.2f}x" for r in rows), flush=True)
