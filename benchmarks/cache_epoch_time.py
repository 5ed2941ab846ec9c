"""Time per training epoch with and without the logit caches, side by side in one process.

For each model pair: (a) a KD stage running the teacher vs reading the teacher cache
(dense fp16, and top-k); (b) an SMSKD stage (KD + reference) with the teacher cached,
running the reference vs reading the reference cache, against the plain KD stage with
the teacher cached. Epochs are timed with SMSKDTrainer._train_epoch (the trainer's
own loop), the variants in turn, round robin; cache building is timed separately
("setup": paid once per run for the teacher, once per stage for the reference).
Also the cache's bytes per sample (and per token for text).

    PYTHONPATH=. python benchmarks/cache_epoch_time.py --pair digits --repeats 3
    PYTHONPATH=. python benchmarks/cache_epoch_time.py --pair cifar --samples 256 --repeats 2
    PYTHONPATH=. python benchmarks/cache_epoch_time.py --pair text --repeats 3

The CIFAR pair (resnet32x4 -> resnet8x4, 100 classes, 32x32) reads synthetic images
in the real CIFAR-100 file format: timing does not depend on the pixels. The text pair
(tiny_lm_large -> tiny_lm_small, byte tokens, V = 256) trains on the shipped stories as
configs/tiny_lm_smskd.yaml does (context 64, batch 16, AdamW, no augmentation, so each
cache holds one epoch that serves every epoch), and adds three SMSKD variants with
fused_linear: true (the loss from hidden states; the frozen models' logits from the caches).
The teacher is randomly initialised: its logits' values do not change the timing.
"""
from __future__ import annotations

import argparse
import json
import pickle
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from smskd_fast.provenance import git_commit
from smskd_fast.training.config import parse_config
from smskd_fast.training.checkpoint import save_model_file
from smskd_fast.training.models import build_model
from smskd_fast.training.trainer import SMSKDTrainer

PAIRS = {
    "digits": dict(teacher="digits_cnn_large", student="digits_cnn_small", data="digits", classes=10, channels=1,
                   batch=64, augment="crop_flip", optimizer={"lr": 0.01}),
    "cifar": dict(teacher="resnet32x4", student="resnet8x4", data="cifar100", classes=100, channels=3,
                  batch=64, augment="crop_flip", optimizer={"lr": 0.01}),
    "text": dict(teacher="tiny_lm_large", student="tiny_lm_small", data="text", classes=256, channels=1,
                 batch=16, augment="none", optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
                 context_length=64),
}


def write_synthetic_cifar(root: Path, count: int) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        entry = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "fine_labels": rng.integers(0, 100, count).tolist()}
        with open(folder / split, "wb") as handle:
            pickle.dump(entry, handle)


def make_config(pair: dict, work: Path, samples: int, teacher_cache: dict | None, reference_cache: dict | None,
                threads: int, fused_linear: bool = False):
    data = {"name": pair["data"], "batch_size": pair["batch"], "train_subset": samples, "test_subset": 64,
            "augment": pair["augment"]}
    if pair["data"] == "text":
        data["context_length"] = pair["context_length"]  # the shipped stories: no root
    else:
        data["root"] = str(work / "data")
    raw = {
        "seed": 0, "plots": False, "progress": False, "threads": threads, "data": data,
        "student": {"name": pair["student"]},
        "teacher": {"name": pair["teacher"], "checkpoint": str(work / "teacher.pt")},
        "defaults": {"optimizer": pair["optimizer"], "schedule": {"name": "constant"},
                     **({"temperature": 2.0} if pair["data"] == "text" else {})},  # as configs/tiny_lm_smskd.yaml
        "stages": [{"method": "kd", "epochs": 1, "fused_linear": fused_linear},
                   {"method": "kd", "epochs": 1, "fused_linear": fused_linear}],
    }
    cache = {}
    if teacher_cache is not None:
        cache["teacher"] = {"dir": str(work / f"teacher_{teacher_cache['format']}_{teacher_cache.get('k', 0)}"),
                            **teacher_cache}
    if reference_cache is not None:
        cache["reference"] = reference_cache
    if cache:
        raw["cache"] = cache
    return parse_config(raw)


def prepare(config, run_dir: Path, stage_index: int):
    """A trainer and its stage state ready to train stage_index, and the seconds its set-up took
    (cache building included: the teacher cache once per run, the reference cache once per stage)."""
    trainer = SMSKDTrainer(config, run_dir, log=lambda _: None)
    trainer.checkpoints.save_stage(0, trainer.student.state_dict(), {})
    started = time.perf_counter()
    trainer.frozen.open_teacher_cache()
    state = trainer._start_stage(stage_index)
    return trainer, state, time.perf_counter() - started


def time_epoch(trainer, state, stage_index: int) -> float:
    """Seconds of one epoch of the trainer's own loop."""
    started = time.perf_counter()
    trainer._train_epoch(stage_index, 0, state, torch.zeros(20))
    return time.perf_counter() - started


def cache_bytes_per_sample(path: Path, samples: int) -> float:
    """Bytes on disk (shards with their .npy headers) per sample and stored epoch."""
    shards = list(path.glob("shard-*.npy"))
    epochs = len({shard.name.split("-")[1] for shard in shards})
    return sum(shard.stat().st_size for shard in shards) / (samples * epochs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", choices=sorted(PAIRS), default="digits")
    parser.add_argument("--samples", type=int, default=1438)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    pair = PAIRS[args.pair]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if pair["data"] == "cifar100":
            write_synthetic_cifar(work / "data", args.samples)
        torch.manual_seed(0)
        save_model_file(build_model(pair["teacher"], pair["classes"], pair["channels"]), pair["teacher"],
                        pair["classes"], pair["channels"], work / "teacher.pt")
        fp16 = {"format": "dense", "dtype": "float16"}
        topk = {"format": "topk", "k": min(args.topk, pair["classes"]), "dtype": "float16"}
        variants = [
            ("kd, teacher runs", 0, None, None, False),
            ("kd, teacher cache fp16", 0, fp16, None, False),
            (f"kd, teacher cache top-{topk['k']}", 0, topk, None, False),
            ("smskd, teacher cache fp16, reference runs", 1, fp16, None, False),
            ("smskd, teacher + reference cache fp16", 1, fp16, {"dtype": "float16"}, False),
        ]
        if pair["data"] == "text":
            variants += [
                ("smskd fused_linear, teacher + reference run", 1, None, None, True),
                ("smskd fused_linear, teacher + reference fp16 cache", 1, fp16, {"dtype": "float16"}, True),
                (f"smskd fused_linear, teacher top-{topk['k']} + reference fp16 cache", 1, topk,
                 {"dtype": "float16"}, True),
            ]
        torch.set_num_threads(args.threads)
        prepared = []
        for index, (name, stage, teacher_cache, reference_cache, fused_linear) in enumerate(variants):
            config = make_config(pair, work, args.samples, teacher_cache, reference_cache, args.threads, fused_linear)
            prepared.append((name, stage) + prepare(config, work / f"run{index}", stage))
        seconds = {name: [] for name, *_ in prepared}
        for _ in range(args.repeats):  # round robin, so that a change of machine load hits every variant alike
            for name, stage, trainer, state, _ in prepared:
                seconds[name].append(time_epoch(trainer, state, stage))
        rows = [{"variant": name, "epoch_seconds": seconds[name], "median": statistics.median(seconds[name]),
                 "setup_seconds": setup} for name, _, _, _, setup in prepared]
        samples = len(prepared[0][2].data.train)
        sizes = {
            "dense fp16": cache_bytes_per_sample(work / "teacher_dense_0", samples),
            f"top-{topk['k']} fp16": cache_bytes_per_sample(work / f"teacher_topk_{topk['k']}", samples),
        }
    base = rows[0]["median"]
    kd_cached = rows[1]["median"]
    commit = git_commit()
    tokens = f" x {pair['context_length']} tokens" if pair["data"] == "text" else ""
    lines = [f"# cache_epoch_time: {args.pair} ({pair['teacher']} -> {pair['student']}), {samples} samples{tokens}, "
             f"batch {pair['batch']}, {args.threads} thread(s), {args.repeats} repeats",
             f"# device: CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"# command: python {' '.join(sys.argv)}",
             f"{'variant':62s} {'median s/epoch':>15s} {'vs kd uncached':>15s} {'vs kd cached':>13s} "
             f"{'setup s':>8s}  epochs"]
    for row in rows:
        lines.append(f"{row['variant']:62s} {row['median']:15.3f} {row['median'] / base:15.3f} "
                     f"{row['median'] / kd_cached:13.3f} {row['setup_seconds']:8.2f}  "
                     + " ".join(f"{s:.3f}" for s in row["epoch_seconds"]))
    lines.append("cache bytes per sample per stored epoch: " + ", ".join(f"{k}: {v:.1f}" for k, v in sizes.items()))
    if pair["data"] == "text":  # one stored epoch serves every epoch (no augmentation)
        lines.append("cache bytes per token: " + ", ".join(f"{k}: {v / pair['context_length']:.2f}"
                                                           for k, v in sizes.items()))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "bytes_per_sample": sizes,
                                                             "samples": samples, "command": sys.argv,
                                                             "args": {k: str(v) for k, v in vars(args).items()}},
                                                            indent=1))


if __name__ == "__main__":
    main()
