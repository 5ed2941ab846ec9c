"""How far the top-k KD term is from the dense one: relative gap per (C, k, T).

Teacher logits are Gaussian with a boosted true class (a confident, mostly right
teacher), the student is the teacher plus Gaussian noise; or pass --logits FILE
(a torch.save'd dict with "teacher", "student", "target") for real models.
Writes JSON and a Markdown table under benchmarks/results/.

    python benchmarks/topk_error.py --out benchmarks/results/topk_error
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

import smskd_fast
from smskd_fast.bench import harness as benchmarking
from smskd_fast.provenance import git_commit
from smskd_fast.backends.topk import TopKTeacher


def synthetic(rows: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (rows,), generator=g)
    teacher = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 2.0
    teacher[torch.arange(rows), target] += 6.0
    student = teacher + torch.randn(rows, classes, generator=g, dtype=torch.float64) * 1.5
    return student, teacher, target


def gaps(student, teacher, target, ks, temperatures):
    results = []
    for T in temperatures:
        dense = smskd_fast.smskd_loss(student, target, teacher, temperature=T, reduction="none",
                                      backend="reference").kd
        for k in ks:
            topk = TopKTeacher.from_logits(teacher, target, k, T)
            approx = smskd_fast.smskd_loss(student, target, teacher_topk=topk, temperature=T, reduction="none",
                                           backend="reference").kd
            relative = (dense - approx) / dense.clamp(min=1e-12)
            results.append({"classes": teacher.shape[-1], "k": k, "temperature": T,
                            "dense_mean": dense.mean().item(), "topk_mean": approx.mean().item(),
                            "mean_relative_gap": relative.mean().item(),
                            "p95_relative_gap": relative.quantile(0.95).item()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logits", type=Path)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 32000])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 10, 20, 50, 100])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    benchmarking.refuse_existing_outputs(parser, args.out)
    if args.logits:
        data = torch.load(args.logits)
        sets = [(data["student"].double(), data["teacher"].double(), data["target"])]
    else:
        sets = [synthetic(args.rows, c) for c in args.classes]
    results = []
    for student, teacher, target in sets:
        ks = [k for k in args.k if k <= teacher.shape[-1]]
        results += gaps(student, teacher, target, ks, args.temperatures)
    commit = git_commit()
    header = (f"top-k KD vs dense KD, {'logits from ' + str(args.logits) if args.logits else 'synthetic logits'}, "
              f"commit {commit}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    lines = [header, "", "| C | k | T | dense KD (mean) | top-k KD (mean) | mean relative gap | p95 relative gap |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['classes']} | {r['k']} | {r['temperature']:g} | {r['dense_mean']:.4f} | "
                     f"{r['topk_mean']:.4f} | {r['mean_relative_gap']:.2%} | {r['p95_relative_gap']:.2%} |")
    benchmarking.write_results(args.out, header, "\n".join(lines), results)


if __name__ == "__main__":
    main()
