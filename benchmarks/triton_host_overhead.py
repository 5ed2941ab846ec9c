"""Host cost of the Triton backend's own Python per call, without a GPU: its op body called past the
dispatcher (ops/registration.py call_functional_op's eager, the plain eager path) against the op itself.

At C = 100 or 1000 a call costs what the host does to issue it (docs/perf_notes.md, predictions 5-6).
The Triton backend's host code is Python: the op (a torch.library.triton_op), its argument checks, the
mean's scale, the launchers, the reductions, autograd. This script runs exactly that code on CPU
tensors with every Triton launch replaced by a no-op (TRITON_INTERPRET=1, so that the backend accepts
CPU tensors; the interpreter itself never runs), and times forward + backward of the public API's loss
at a small shape, and the forward alone under no_grad (evaluation), alternating the two paths in one run
(ratios: this machine is noisy). Not in the two
columns: Triton's own launcher (its argument binding, the CUDA launch: the same for both paths, and it
needs a GPU; benchmarks/host_overhead.py --device cuda measures whole calls there), and, on the op path
only, the wrapper its body puts around each launch on a GPU (torch.library.wrap_triton(kernel)[grid],
for torch.compile to see the kernel: the interpreter's kernels are launched bare). Its cost is measured
apart, in a process without the interpreter, and reported per launch (2 per forward).

    python benchmarks/triton_host_overhead.py --out benchmarks/results/triton_host_overhead_<date>
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the backend then takes CPU tensors

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import torch  # noqa: E402

import smskd_fast  # noqa: E402
from smskd_fast.backends.topk import TopKTeacher  # noqa: E402
from smskd_fast.backends.triton import kernels, launch, topk_kernels  # noqa: E402
from smskd_fast.ops import registration  # noqa: E402
from smskd_fast.provenance import git_commit  # noqa: E402
from bench_grid import TEMPERATURE, make_inputs  # noqa: E402

PATHS = ("op", "body")


class NoLaunch:
    """Stands for a Triton kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def launches_removed() -> None:
    """Every kernel the launchers can start becomes a no-op; the host-side target check (the interpreter's
    stand-in for the device's) goes too, as on a GPU it is a launch."""
    for module in (kernels, topk_kernels):
        for name in dir(module):
            if name.endswith("_kernel"):
                setattr(module, name, NoLaunch())
    launch.check_targets_on_host = lambda *args: None
    launch.kernels_interpreted = lambda: True


def loss_step(topk: bool, reduction: str, n: int, c: int, training: bool) -> Callable[[], None]:
    """One call of the public API's loss: forward + backward when training, else a forward under no_grad
    (evaluation)."""
    student, target, teacher, reference = make_inputs(n, c, torch.float32, "cpu")
    student.requires_grad_()
    teacher_args = {"teacher_logits": teacher}
    if topk:
        values, indices = teacher.topk(4, dim=-1)
        teacher_args = {"teacher_topk": TopKTeacher(values, indices, teacher.gather(1, target[:, None])[:, 0],
                                                    teacher.logsumexp(-1), (teacher / TEMPERATURE).logsumexp(-1))}

    def loss():
        return smskd_fast.smskd_loss(student, target, reference_logits=reference, temperature=TEMPERATURE,
                                     backend="triton", reduction=reduction, **teacher_args)

    def train_step():
        student.grad = None
        out = loss()
        (out.loss if reduction != "none" else out.loss.sum()).backward()

    def evaluation_step():
        with torch.no_grad():
            loss()
    return train_step if training else evaluation_step


def timed(step: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls * 1e6


def measure(topk: bool, reduction: str, training: bool, args) -> Dict:
    """Both paths of one case, batch after batch in turn; medians in us per call."""
    step = loss_step(topk, reduction, args.rows, args.classes, training)
    plain = registration.plain_eager_call
    choose = {"op": lambda arguments: False, "body": plain}
    times: Dict[str, List[float]] = {path: [] for path in PATHS}
    for path in PATHS:  # warm-up
        registration.plain_eager_call = choose[path]
        timed(step, max(args.calls // 4, 10))
    for _ in range(args.batches):
        for path in PATHS:
            registration.plain_eager_call = choose[path]
            times[path].append(timed(step, args.calls))
    registration.plain_eager_call = plain
    medians = {path: statistics.median(values) for path, values in times.items()}
    return {"teacher": "top-k" if topk else "dense", "reduction": reduction,
            "call": "fwd+bwd" if training else "no_grad fwd", "N": args.rows, "C": args.classes,
            **{f"{path}_us": medians[path] for path in PATHS},
            **{f"{path}_us_all": times[path] for path in PATHS},
            "body_over_op": medians["body"] / medians["op"]}


WRAP_COST = """
import statistics, timeit, torch
from smskd_fast.backends.triton import kernels
kernel = kernels._check_targets_kernel
runs = [timeit.timeit(lambda: torch.library.wrap_triton(kernel)[(1,)], number=5000) / 5000 * 1e6 for _ in range(7)]
bare = [timeit.timeit(lambda: kernel[(1,)], number=5000) / 5000 * 1e6 for _ in range(7)]
print(statistics.median(runs), statistics.median(bare))
"""


def wrap_triton_cost_us() -> Dict[str, float]:
    """us per launch of wrap_triton(kernel)[grid] and of kernel[grid] (no launch: the callable only), in a
    process where the kernels are compiled JITFunctions, as on a GPU."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    output = subprocess.run([sys.executable, "-c", WRAP_COST], capture_output=True, text=True, check=True,
                            cwd=ROOT, env=environment).stdout.split()
    return {"wrap_triton_us": float(output[0]), "bare_us": float(output[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--calls", type=int, default=300, help="calls per timed batch")
    parser.add_argument("--batches", type=int, default=9, help="timed batches per path, alternating")
    parser.add_argument("--out", type=Path, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    launches_removed()
    rows = [measure(topk, reduction, training, args)
            for training in (True, False) for topk in (False, True) for reduction in ("mean", "none")]
    wrap = wrap_triton_cost_us()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Triton backend host code per call, kernels not launched (CPU, {platform.processor() or platform.machine()})",
             "",
             f"Command: `python benchmarks/triton_host_overhead.py {' '.join(sys.argv[1:])}`; {stamp}; commit "
             f"{git_commit()}; torch {torch.__version__}; 1 thread; {args.batches} batches of {args.calls} calls per "
             "path, alternating; medians.",
             "op: through torch.ops (the dispatcher's triton_op layers); body: the op's body called directly "
             "(plain eager calls; without a gradient, evaluation calls too since 2026-12-06).",
             "",
             "| call | teacher | reduction | N x C | op us/call | body us/call | body / op |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['call']} | {row['teacher']} | {row['reduction']} | {row['N']}x{row['C']} | {row['op_us']:.1f} | "
                     f"{row['body_us']:.1f} | {row['body_over_op']:.3f} |")
    lines += ["", f"Not in the op column: on a GPU its body wraps each launch, wrap_triton(kernel)[grid] "
              f"{wrap['wrap_triton_us']:.1f} us against {wrap['bare_us']:.2f} us for kernel[grid] (median, "
              "no launch), 2 launches per forward."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"command": "python benchmarks/triton_host_overhead.py " + " ".join(sys.argv[1:]), "date": stamp,
             "commit": git_commit(), "torch": torch.__version__, "machine": platform.machine(),
             "cpus": os.cpu_count(), "rows": rows, "per_launch": wrap}, indent=1))


if __name__ == "__main__":
    main()
