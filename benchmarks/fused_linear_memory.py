"""Peak memory and time of fused_linear_smskd_loss against the unfused composition.

Each (variant, shape) runs in a fresh subprocess so that peak memory is its own:
on the CPU the peak resident set size above the level reached once the inputs
exist (VmHWM - VmRSS), on CUDA torch.cuda.max_memory_allocated above the inputs.
Forward plus backward, median of --repeats. Variants:

- unfused / fused: the SMSKD loss with student, teacher and reference heads
  (materialised logits + smskd_loss, against fused_linear_smskd_loss);
- unfused_kd / fused_kd / liger_jsd: KD only (student and teacher heads, CE + KL),
  the case Liger's LigerFusedLinearJSD (jsd_beta=0: KL(teacher || student), no CE)
  also covers; liger_jsd needs liger-kernel and a GPU, and is added to the default
  variants on CUDA whenever liger_kernel imports.

Ratios are against the unfused variant of the same kind, and (column "vs liger") of
every variant against liger_jsd of the same shape when it ran. --hidden and --vocab
take several values (every combination is measured); --chunk-size fixes the fused
variants' rows per chunk (default: fused_linear.chunk_rows, recorded per row).

On the CPU, glibc's malloc raises its mmap threshold (up to 32 MiB) after large frees and
then keeps freed chunk buffers in the heap, so the resident set overstates live memory for
chunks of a few MiB; run with MALLOC_MMAP_THRESHOLD_=65536 (fixed threshold: every large
buffer is mapped and returned on free) to measure live memory. The header records it.

    python benchmarks/fused_linear_memory.py --device cpu --tokens 2048 --hidden 512 \
        --vocab 32000 128256 --dtype float32 --out benchmarks/results/fused_linear_cpu
    python benchmarks/fused_linear_memory.py --device cuda --tokens 8192 --hidden 2048 4096 \
        --vocab 32000 128256 --dtype bfloat16 --out $OUT/fused_linear_gpu_bf16   # + liger_jsd if installed
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from smskd_fast.backends import available_backends
from smskd_fast.bench import harness as benchmarking
from smskd_fast.provenance import git_commit

VARIANTS = ("unfused", "fused", "unfused_kd", "fused_kd", "liger_jsd")
DEFAULT_VARIANTS = ("unfused", "fused", "unfused_kd", "fused_kd")
BASELINE = {"unfused": "unfused", "fused": "unfused", "unfused_kd": "unfused_kd", "fused_kd": "unfused_kd",
            "liger_jsd": "unfused_kd"}
TEMPERATURE = 2.0


def read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_step(variant, h_s, w_s, h_t, w_t, h_r, w_r, target, backend, chunk_size=None):
    """The loss of one variant as a function of nothing (inputs are closed over)."""
    import smskd_fast

    if variant == "fused":
        return lambda: smskd_fast.fused_linear_smskd_loss(h_s, w_s, target, h_t, w_t, None, h_r, w_r,
                                                          temperature=TEMPERATURE, backend=backend,
                                                          chunk_size=chunk_size).loss
    if variant == "unfused":
        def unfused():
            s, t, r = h_s @ w_s.t(), (h_t @ w_t.t()).detach(), (h_r @ w_r.t()).detach()
            return smskd_fast.smskd_loss(s, target, t, r, temperature=TEMPERATURE, backend=backend).loss
        return unfused
    kd_only = dict(temperature=TEMPERATURE, ref_weight=0.0, weighting="constant", backend=backend)
    if variant == "fused_kd":
        return lambda: smskd_fast.fused_linear_smskd_loss(h_s, w_s, target, h_t, w_t, chunk_size=chunk_size,
                                                          **kd_only).loss
    if variant == "unfused_kd":
        return lambda: smskd_fast.smskd_loss(h_s @ w_s.t(), target, (h_t @ w_t.t()).detach(), **kd_only).loss
    if variant == "liger_jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)
        return lambda: jsd(h_s, w_s, h_t, w_t, target)
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def measure(variant: str, tokens: int, hidden: int, vocab: int, dtype: str, device: str, repeats: int,
            backend: str = "auto", chunk_size: int = 0) -> dict:
    """Runs in the child process: returns time and peak extra memory of one variant (chunk_size 0: the default)."""
    from smskd_fast.backends import resolve_backend

    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)  # drawn on the device: 3 x V x H values on a CPU take long

    def param(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    h_s, h_t, h_r = param(tokens, hidden), param(tokens, hidden), param(tokens, hidden)
    w_s, w_t, w_r = (param(vocab, hidden, scale=hidden ** -0.5) for _ in range(3))
    target = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)
    loss_of = make_step(variant, h_s, w_s, h_t, w_t, h_r, w_r, target, backend, chunk_size or None)

    def step():
        h_s.grad = w_s.grad = None
        loss_of().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:  # the peak from here on: creating the inputs (float32 draws, then a cast) peaked above them
        base = benchmarking.reset_peak_resident()
    step()  # warm-up; its peak counts (the first step allocates the .grad buffers too)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else read_status_kib("VmHWM") * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    row_backend = "liger" if variant == "liger_jsd" else resolve_backend(backend, h_s.device, dt, vocab).name
    chunk = None
    if variant in ("fused", "fused_kd"):
        from smskd_fast.loss.fused_linear import chunk_rows

        chunk = chunk_size or chunk_rows(h_s.device.type, tokens, vocab, hidden, dt, heads=3 if variant == "fused" else 2)
    return {"variant": variant, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": dtype,
            "device": device, "median_s": statistics.median(times), "times_s": times,
            "peak_extra_bytes": peak - base, "backend": row_backend, "chunk_rows": chunk}


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tokens", type=benchmarking.positive_int, default=2048)
    parser.add_argument("--hidden", type=benchmarking.positive_int, nargs="+", default=[512])
    parser.add_argument("--vocab", type=benchmarking.positive_int, nargs="+", default=[32000, 128256])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=benchmarking.positive_int, default=3)
    parser.add_argument("--backend", default="auto", choices=("auto", *available_backends()),
                        help="row backend of smskd_loss and the fused path")
    parser.add_argument("--chunk-size", type=int, default=0, help="rows per chunk of the fused variants (0: default)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="default: unfused fused unfused_kd fused_kd, and liger_jsd on CUDA when it imports")
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_size < 0:
        parser.error(f"argument --chunk-size: expected 0 (the default) or a positive integer, got {args.chunk_size}")
    if args.child:
        variant, tokens, hidden, vocab, dtype, repeats = args.child
        print(json.dumps(measure(variant, int(tokens), int(hidden), int(vocab), dtype, args.device, int(repeats),
                                 args.backend, args.chunk_size)))
        return
    benchmarking.refuse_existing_outputs(parser, args.out)
    requested = args.variants or list(DEFAULT_VARIANTS) + (
        ["liger_jsd"] if args.device == "cuda" and liger_available() else [])
    variants = list(dict.fromkeys([BASELINE[v] for v in requested] + requested))  # every ratio needs its baseline
    results = []
    for hidden in args.hidden:
        for vocab in args.vocab:
            for variant in variants:
                child = [sys.executable, __file__, "--device", args.device, "--backend", args.backend,
                         "--chunk-size", str(args.chunk_size), "--child", variant, str(args.tokens), str(hidden),
                         str(vocab), args.dtype, str(args.repeats)]
                done = subprocess.run(child, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{variant} hidden {hidden} vocab {vocab} failed:\n{done.stderr[-2000:]}", file=sys.stderr,
                          flush=True)
                    continue
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(results[-1], flush=True)
    commit = git_commit()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    header = (f"fused_linear_smskd_loss vs unfused, fwd+bwd, tokens={args.tokens} hidden={args.hidden} "
              f"{args.dtype} on {args.device} ({device_name}), backend {args.backend}, torch {torch.__version__}, "
              f"commit {commit}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, "
              f"chunk rows {args.chunk_size or 'default'}")
    lines = [header, "", "| hidden | vocab | variant | row backend | chunk rows | median ms | peak extra MiB "
             "| memory vs baseline | time vs baseline | baseline | time vs liger |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for hidden in args.hidden:
        for vocab in args.vocab:
            rows = {r["variant"]: r for r in results if r["vocab"] == vocab and r["hidden"] == hidden}
            for variant in variants:
                if variant not in rows:
                    lines.append(f"| {hidden} | {vocab} | {variant} | failed (see stderr) | | | | | | | |")
                    continue
                r, base, liger = rows[variant], rows.get(BASELINE[variant]), rows.get("liger_jsd")
                memory = f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.3f}" if base else "n/a"
                speed = f"{r['median_s'] / base['median_s']:.2f}x" if base else "n/a"
                versus_liger = f"{r['median_s'] / liger['median_s']:.2f}x" if liger else "n/a"
                lines.append(f"| {hidden} | {vocab} | {variant} | {r['backend']} | {r.get('chunk_rows') or ''} | "
                             f"{r['median_s'] * 1e3:.1f} | {r['peak_extra_bytes'] / 2**20:.0f} | {memory} | {speed} | "
                             f"{BASELINE[variant]} | {versus_liger} |")
    benchmarking.write_results(args.out, header, "\n".join(lines), results, device=args.device)


if __name__ == "__main__":
    main()
