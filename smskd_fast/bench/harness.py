"""Shared pieces of the loss benchmarks: the shape grid, the eager baseline, timing and memory.

benchmarks/bench_cpu_loss.py (pytest-benchmark), benchmarks/cpu_loss_table.py (JSON and
Markdown into benchmarks/results/) and the `smskd-fast bench` demo all measure the same
thing with these helpers: our fused op against the composition of torch.nn.functional
calls that computes the same loss and gradient, eagerly and under torch.compile.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from smskd_fast.loss.functional import smskd_loss
from smskd_fast.provenance import git_commit

SHAPES: Tuple[Tuple[int, int], ...] = ((4096, 100), (4096, 1000), (1024, 32000), (256, 128256))
DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
MODES: Tuple[str, ...] = ("forward", "forward+backward")
METHODS: Tuple[str, ...] = ("smskd_fast", "eager", "torch.compile")
TEMPERATURE = 4.0


def eager_smskd_loss(student: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor,
                     reference: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The default SMSKD loss (mean reduction, inverse_tcp weighting) from torch.nn.functional.

    Computed in float32 like our kernels, so that bf16 inputs get the same accuracy.
    """
    T = temperature
    student = student.float()
    log_q = F.log_softmax(student / T, dim=-1)
    ce = F.cross_entropy(student, target)
    kd = F.kl_div(log_q, F.log_softmax(teacher.float() / T, dim=-1), log_target=True, reduction="batchmean")
    with torch.no_grad():
        tcp = F.softmax(teacher.float(), dim=-1).gather(-1, target[:, None]).squeeze(-1)
    per_row_ref = F.kl_div(log_q, F.log_softmax(reference.float() / T, dim=-1), log_target=True,
                           reduction="none").sum(-1)
    return ce + T * T * kd + T * T * ((1 - tcp) * per_row_ref).mean()


def fused_smskd_loss(student: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor,
                     reference: torch.Tensor, temperature: float = TEMPERATURE,
                     backend: str = "auto") -> torch.Tensor:
    """The same loss through smskd_fast.smskd_loss."""
    return smskd_loss(student, target, teacher, reference, temperature=temperature, backend=backend).loss


_COMPILED: Dict[str, Callable] = {}


def reset_compilation() -> None:
    """Forgets every torch.compile'd graph, so that the next "torch.compile" step compiles afresh:
    dynamo's per-function recompile limit (8) is otherwise reached after 8 shapes, dtypes or modes,
    and fullgraph=True then fails."""
    torch._dynamo.reset()
    _COMPILED.clear()


def loss_function(method: str, backend: str = "auto") -> Callable[..., torch.Tensor]:
    """The loss callable of a method: "smskd_fast", "eager" or "torch.compile" (of eager)."""
    if method == "smskd_fast":
        return lambda *args: fused_smskd_loss(*args, backend=backend)
    if method == "eager":
        return eager_smskd_loss
    if method == "torch.compile":
        if "eager" not in _COMPILED:
            _COMPILED["eager"] = torch.compile(eager_smskd_loss, fullgraph=True, dynamic=False)
        return _COMPILED["eager"]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def make_inputs(n: int, c: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """Student, target, teacher and reference logits of shape (n, c), like a classifier's."""
    generator = torch.Generator().manual_seed(seed)
    student, teacher, reference = (
        (torch.randn(n, c, generator=generator) * 3).to(device, dtype) for _ in range(3)
    )
    target = torch.randint(0, c, (n,), generator=generator).to(device)
    return student, target, teacher, reference


def make_step(method: str, mode: str, inputs, backend: str = "auto") -> Callable[[], torch.Tensor]:
    """One call of the loss (mode "forward") or of the loss and its gradient ("forward+backward")."""
    student, target, teacher, reference = inputs
    fn = loss_function(method, backend)
    if mode == "forward":
        student = student.detach()

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(student, target, teacher, reference)
        return forward
    if mode != "forward+backward":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    student = student.detach().requires_grad_(True)

    def forward_backward() -> torch.Tensor:
        loss = fn(student, target, teacher, reference)
        (grad,) = torch.autograd.grad(loss, student)
        return grad
    return forward_backward


def interleaved_seconds(steps: Dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> Dict[str, List[float]]:
    """Wall times of each step over repeats rounds; each round runs every step once, in turn,
    so that a change in the machine's load (other processes) affects all steps alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def prepare_memory_measurement() -> None:
    """Makes glibc map every allocation of 64 KiB or more on its own, so that freeing
    it lowers the resident size at once and the peak resident size is a peak of tensors."""
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)


def peak_memory_supported() -> bool:
    """Peak memory is read from Linux's resettable peak resident size (VmHWM)."""
    return sys.platform.startswith("linux")


def reset_peak_resident() -> int:
    """Resets Linux's peak resident size (VmHWM) to the current resident size, which it returns
    (bytes): a peak read after it is one of what ran since, not of what the process did before."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_bytes("VmRSS:")


def peak_extra_bytes(step: Callable[[], object]) -> int:
    """Peak resident memory of one step() beyond what was resident before it (inputs),
    counting what it returns (e.g. the gradient). Linux only; call step() once before."""
    prepare_memory_measurement()
    gc.collect()
    before = reset_peak_resident()
    result = step()
    peak = _status_bytes("VmHWM:")
    del result
    return max(peak - before, 0)


@dataclass
class Measurement:
    n: int
    c: int
    dtype: str
    mode: str
    method: str
    median_ms: float
    min_ms: float
    peak_extra_mib: Optional[float]
    gradient_mib: float  # one N x C buffer in the input dtype, the memory target's unit

    def as_dict(self) -> dict:
        return asdict(self)


def measure_group(n: int, c: int, dtype: torch.dtype, mode: str, methods: Sequence[str], repeats: int,
                  backend: str = "auto", with_memory: bool = True) -> List[Measurement]:
    """Time (interleaved) and peak extra memory of each method on one shape, dtype and mode."""
    if with_memory and peak_memory_supported():
        prepare_memory_measurement()  # before any allocation, so that memory is comparable
    if "torch.compile" in methods:
        reset_compilation()  # one per shape, dtype and mode: a long grid would reach the recompile limit
    inputs = make_inputs(n, c, dtype)
    steps = {method: make_step(method, mode, inputs, backend) for method in methods}
    times = interleaved_seconds(steps, repeats)
    element = torch.empty((), dtype=dtype).element_size()
    results = []
    for method, step in steps.items():
        peak = peak_extra_bytes(step) / 2**20 if with_memory and peak_memory_supported() else None
        results.append(Measurement(n, c, str(dtype).replace("torch.", ""), mode, method,
                                   statistics.median(times[method]) * 1e3, min(times[method]) * 1e3,
                                   peak, n * c * element / 2**20))
    return results


def run_grid(shapes: Sequence[Tuple[int, int]] = SHAPES, dtypes: Iterable[torch.dtype] = DTYPES,
             modes: Iterable[str] = MODES, methods: Sequence[str] = METHODS, repeats: int = 5,
             backend: str = "auto", with_memory: bool = True,
             progress: Optional[Callable[[Measurement], None]] = None) -> List[Measurement]:
    """Every (shape, dtype, mode) of the grid, with all methods measured side by side."""
    results = []
    for n, c in shapes:
        for dtype in dtypes:
            for mode in modes:
                for result in measure_group(n, c, dtype, mode, methods, repeats, backend, with_memory):
                    results.append(result)
                    if progress is not None:
                        progress(result)
    return results


def speedups(results: Sequence[Measurement], method: str = "smskd_fast") -> List[dict]:
    """For each (shape, dtype, mode): method's time and memory next to each other method's, as ratios."""
    grouped: Dict[tuple, Dict[str, Measurement]] = {}
    for r in results:
        grouped.setdefault((r.n, r.c, r.dtype, r.mode), {})[r.method] = r
    rows = []
    for (n, c, dtype, mode), by_method in grouped.items():
        ours = by_method.get(method)
        if ours is None:
            continue
        row = {"n": n, "c": c, "dtype": dtype, "mode": mode, f"{method}_ms": ours.median_ms,
               f"{method}_min_ms": ours.min_ms, f"{method}_peak_mib": ours.peak_extra_mib,
               "gradient_mib": ours.gradient_mib}
        for other, measurement in by_method.items():
            if other == method:
                continue
            row[f"{other}_ms"] = measurement.median_ms
            row[f"{other}_min_ms"] = measurement.min_ms
            row[f"{other}_peak_mib"] = measurement.peak_extra_mib
            row[f"speedup_vs_{other}"] = measurement.median_ms / ours.median_ms
            row[f"min_speedup_vs_{other}"] = measurement.min_ms / ours.min_ms
        rows.append(row)
    return rows


def positive_int(text: str) -> int:
    """argparse type of a count or size: an integer >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU's model name (/proc/cpuinfo where it exists)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> Optional[str]:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str = "cpu") -> dict:
    """Where and when a result was measured: UTC date, commit, device, torch/triton/Python versions."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "commit": git_commit(), "device": device, "device_name": device_name(device),
            "torch": torch.__version__, "triton": package_version("triton"),
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}


def result_paths(out: Path) -> Tuple[Path, Path]:
    """out.json and out.md."""
    return out.with_suffix(".json"), out.with_suffix(".md")


def refuse_existing(paths: Iterable[Path]) -> None:
    """Raises FileExistsError naming the first path that exists: results are never replaced silently.
    Call it before measuring too, so that a run is refused at once, not at its end."""
    for path in paths:
        if Path(path).exists():
            raise FileExistsError(f"{path} exists: choose another output name or remove the old results")


def refuse_existing_outputs(parser: argparse.ArgumentParser, out: Optional[Path]) -> None:
    """A usage error naming --out when OUT.json or OUT.md exists: checked before a run, not at its end."""
    if out is not None:
        try:
            refuse_existing(result_paths(out))
        except FileExistsError as error:
            parser.error(f"argument --out: {error}")


def write_files_new(files: Dict[Path, str]) -> None:
    """Writes path -> text as new files, all or none: existing paths are refused (FileExistsError); each
    text goes to a temporary file beside its path, and all are renamed into place once all are written."""
    refuse_existing(files)
    temporaries: Dict[Path, Path] = {}
    try:
        for path, text in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(temporary, "x") as stream:  # the umask's permissions, as a plain write's
                temporaries[path] = temporary
                stream.write(text)
    except BaseException:
        for temporary in temporaries.values():
            os.unlink(temporary)
        raise
    for path, temporary in temporaries.items():
        os.replace(temporary, path)


def write_results(out: Optional[Path], header: str, table: str, results: List[dict],
                  device: str = "cpu") -> None:
    """Prints the Markdown table and, given out, writes out.json (header, command, environment, results)
    and out.md (the command and the table) beside each other, as benchmarks/results/ keeps them; existing
    files are refused (FileExistsError), and the two are written all or none (write_files_new)."""
    print(table)
    if out is None:
        return
    json_path, md_path = result_paths(out)
    write_files_new({json_path: json.dumps({"header": header, "command": sys.argv, "environment": environment(device),
                                            "results": results}, indent=1),
                     md_path: f"Command: `python {' '.join(sys.argv)}`\n\n{table}\n"})
