"""The study: every baseline and SMSKD variant of a config over several seeds, with statistics.

Variants (experiments.variant_configs) share the total epochs and each stage's
optimizer and schedule: the student alone, each configured method alone, the summed
multi-method loss, the stages in sequence without a reference, and SMSKD with
constant, tcp and inverse_tcp ("smskd") weighting. Per variant the report gives the
mean, the sample standard deviation and the 95% t-interval of the last-epoch
accuracy; each variant is compared seed by seed with the best baseline (paired
differences, their 95% t-interval, the two-sided paired t-test p-value, and that p-value
Holm-adjusted over all the comparisons with the best baseline on the same split, since
several variants are tested against one baseline). Where a test is undefined (one seed;
every seed's difference the same) the report says so instead of printing a p-value.

The best baseline is chosen on the validation split (data.validation_fraction > 0)
whenever there is one, so that no choice is made on the test split; the report says
which split chose it. The comparisons on the split that chose the baseline favour it (it was
picked as the maximum there); those on the other split (test) are the unbiased ones.

Resumable: each finished (variant, seed) is stored as results/<variant>/seed<N>.json and
skipped on a rerun; an interrupted run resumes from its latest epoch. A rerun whose config
differs from a stored run's config.yaml is refused before anything is trained or written. Seeds and variants
run in parallel processes with jobs > 1 (the teachers first, one per seed).
"""
from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from smskd_fast.provenance import git_commit
from smskd_fast.training.config import RunConfig, config_to_dict
from smskd_fast.training.experiments import (refuse_another_config, run_or_resume, single_method_variants,
                                              teacher_config, train_teacher, variant_configs)
from smskd_fast.training.frozen_logits import views_depend_on_epoch
from smskd_fast.training.optional_packages import require_matplotlib
from smskd_fast.training.run_files import write_text_atomic
from smskd_fast.training.stats import format_p, holm, paired_comparison, summarize_values

__all__ = ["study_variants", "run_study", "analyse", "format_report", "plot_study", "PUBLISHED",
           "SMSKD_VARIANTS", "train_variant"]

SMSKD_VARIANTS = ("smskd_constant", "smskd_tcp", "smskd")
STUDY_PLOT = "the study's plot (study.png)"  # the feature that needs matplotlib, in its error
# Published CIFAR-100 top-1 (%) of single methods, (teacher, student) -> variant -> value:
# CRD (Tian et al. 2020) Table 1 and DKD (Zhao et al. 2022) Table 1, resnet32x4 -> resnet8x4.
PUBLISHED = {("resnet32x4", "resnet8x4"): {"student_alone": 72.50, "kd": 73.33, "only_fitnet": 73.50,
                                           "only_crd": 75.51, "only_dkd": 76.32}}


def study_variants(config: RunConfig) -> List[str]:
    """student_alone, each method alone, summed, sequential_no_reference, then the SMSKD weightings."""
    singles = single_method_variants(config)
    summed = ["summed"] if len(config.stages) > 1 or len(singles) > 1 else []
    sequential = ["sequential_no_reference"] if len(config.stages) > 1 else []
    return ["student_alone", *singles, *summed, *sequential, *SMSKD_VARIANTS]


def _result_path(out: Path, variant: str, seed: int) -> Path:
    return out / "results" / variant / f"seed{seed}.json"


def _row(variant: str, seed: int, summary: Dict[str, Any], seconds: float) -> Dict[str, Any]:
    keys = ("last_test_acc", "best_test_acc", "last_val_acc", "last_test_perplexity", "epochs")
    return {"variant": variant, "seed": seed, **{key: summary[key] for key in keys if key in summary},
            "seconds": seconds}


def _teacher_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}" / "teacher"


def _seeded(config: RunConfig, seed: int, teacher_seed: Optional[int] = None) -> RunConfig:
    """The config of one seed. Its teacher cache (if any) is that of the teacher it uses, and of the
    seed's own training views where augmentation makes them depend on the seed (a shared teacher's
    cache then holds one per student seed)."""
    import copy

    seeded = copy.deepcopy(config)
    seeded.seed, seeded.progress, seeded.plots = seed, False, False
    if seeded.cache is not None and seeded.cache.teacher is not None:
        folder = f"seed{seed}"
        if teacher_seed is not None:
            folder = f"seed{teacher_seed}_student{seed}" if views_depend_on_epoch(seeded) else f"seed{teacher_seed}"
        seeded.cache.teacher.dir = str(Path(seeded.cache.teacher.dir) / folder)
    return seeded


def _quiet(_: str) -> None:
    pass


def train_seed_teacher(config: RunConfig, out: Path, seed: int) -> Dict[str, Any]:
    """Trains (or reuses) the teacher of `seed`; returns its result row."""
    started = time.monotonic()
    train_teacher(_seeded(config, seed), _teacher_dir(out, seed), log=_quiet)
    summary = json.loads((_teacher_dir(out, seed) / "summary.json").read_text())
    return _row("teacher", seed, summary, time.monotonic() - started)


def _variant_run(config: RunConfig, out: Path, variant: str, seed: int,
                 teacher_seed: Optional[int]) -> Tuple[RunConfig, Path]:
    """The config and directory of one (variant, seed) run; the teacher is the seed's own, or
    teacher_seed's when every seed shares one."""
    teacher_file = _teacher_dir(out, seed if teacher_seed is None else teacher_seed) / "student.pt"
    run_config = variant_configs(_seeded(config, seed, teacher_seed), str(teacher_file), [variant])[variant]
    return run_config, out / f"seed{seed}" / variant


def train_variant(config: RunConfig, out: Path, variant: str, seed: int,
                  teacher_seed: Optional[int] = None) -> Dict[str, Any]:
    """Trains (or resumes) one (variant, seed) run and stores its result row."""
    started = time.monotonic()
    run_config, run_dir = _variant_run(config, out, variant, seed, teacher_seed)
    summary = run_or_resume(run_config, run_dir, _quiet)
    row = _row(variant, seed, summary, time.monotonic() - started)
    write_text_atomic(_result_path(out, variant, seed), json.dumps(row, indent=1))
    return row


def _call(task: Tuple[Callable[..., Dict[str, Any]], tuple]) -> Dict[str, Any]:
    function, arguments = task
    return function(*arguments)


def _execute(tasks: List[Tuple[Callable[..., Dict[str, Any]], tuple]], jobs: int,
             log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Runs tasks here (jobs == 1) or in `jobs` spawned processes; logs each result."""
    def report(row: Dict[str, Any]) -> Dict[str, Any]:
        log(f"seed {row['seed']}: {row['variant']} test {row['last_test_acc']:.2f}% ({row['seconds']:.0f} s)")
        return row

    if jobs <= 1 or len(tasks) <= 1:
        return [report(_call(task)) for task in tasks]
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return [report(row) for row in pool.map(_call, tasks)]


def run_study(config: RunConfig, out: Path, seeds: Sequence[int], variants: Optional[Sequence[str]] = None,
              jobs: int = 1, log: Callable[[str], None] = print, command: str = "",
              teacher_seed: Optional[int] = None) -> Dict[str, Any]:
    """Trains what is missing, then writes study.json, study.txt, study.png and configs/; returns the analysis.

    teacher_seed: every seed's students learn from the one teacher trained with this seed (an
    expensive teacher trained once; the intervals then cover student seeds only), instead of
    each seed training its own."""
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: need distinct seeds, got {list(seeds)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    require_matplotlib(STUDY_PLOT)  # refused now, not after the last run
    out = Path(out)
    variants = list(variants or study_variants(config))
    teacher_seeds = list(seeds) if teacher_seed is None else [teacher_seed]
    for seed in teacher_seeds:  # before anything is written: stored runs must be this config's
        refuse_another_config(teacher_config(_seeded(config, seed)), _teacher_dir(out, seed))
    for variant in variants:
        for seed in seeds:
            refuse_another_config(*_variant_run(config, out, variant, seed, teacher_seed))
    resolved = variant_configs(_seeded(config, seeds[0], teacher_seed), "<seed<N>/teacher/student.pt>", variants)
    for name, variant in resolved.items():  # the seed and teacher checkpoint vary per seed; the rest is this
        write_text_atomic(out / "configs" / f"{name}.yaml", yaml.safe_dump(config_to_dict(variant), sort_keys=False))
    teachers = [seed for seed in teacher_seeds if not (_teacher_dir(out, seed) / "summary.json").is_file()]
    _execute([(train_seed_teacher, (config, out, seed)) for seed in teachers], jobs, log)
    pending = [(variant, seed) for seed in seeds for variant in variants
               if not _result_path(out, variant, seed).is_file()]
    log(f"study: {len(variants)} variants x {len(seeds)} seeds; {len(pending)} runs to train, "
        f"{len(variants) * len(seeds) - len(pending)} stored")
    _execute([(train_variant, (config, out, variant, seed, teacher_seed)) for variant, seed in pending], jobs, log)
    rows = [{**train_seed_teacher(config, out, seed if teacher_seed is None else teacher_seed), "seed": seed}
            for seed in seeds]  # finished: read back (a shared teacher counts once per student seed)
    rows += [json.loads(_result_path(out, variant, seed).read_text()) for variant in variants for seed in seeds]
    analysis = analyse(rows, variants, seeds, published_for(config), teacher_seed=teacher_seed)
    analysis["environment"] = environment(config, command)
    analysis["computed"] = len(pending)
    analysis["teacher_seed"] = teacher_seed
    write_text_atomic(out / "study.json", json.dumps(analysis, indent=1))
    write_text_atomic(out / "study.txt", format_report(analysis))
    plot_study(analysis, out / "study.png")
    return analysis


def published_for(config: RunConfig) -> Dict[str, float]:
    if config.teacher is None:
        return {}
    return PUBLISHED.get((config.teacher.name, config.student.name), {})


def environment(config: RunConfig, command: str) -> Dict[str, Any]:
    device = config.device
    if device == "cpu":
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"
    elif torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.device(config.device))
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git_commit(), "device": device, "torch": torch.__version__,
            "python": sys.version.split()[0], "command": command, "data": config.data.name}


def analyse(rows: List[Dict[str, Any]], variants: Sequence[str], seeds: Sequence[int],
            published: Optional[Dict[str, float]] = None, teacher_seed: Optional[int] = None) -> Dict[str, Any]:
    """Per-variant summaries and the paired comparison of every variant with the best baseline.

    Every variant needs a row for every seed (the comparisons are paired by seed); a missing
    one is refused. With teacher_seed (one teacher shared by every seed) the teacher is one
    model, summarised as one value (no interval), however many seeds' rows repeat it."""
    by_variant: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], {})[row["seed"]] = row
    missing = [f"{variant} seed {seed}" for variant in variants for seed in seeds
               if seed not in by_variant.get(variant, {})]
    if "teacher" in by_variant and teacher_seed is None:
        missing += [f"teacher seed {seed}" for seed in seeds if seed not in by_variant["teacher"]]
    if missing:
        raise ValueError(f"the paired comparisons need every variant at every seed; no result for: "
                         f"{', '.join(missing)}")
    has_val = all("last_val_acc" in by_variant[v][s] for v in variants for s in seeds)
    selection = "last_val_acc" if has_val else "last_test_acc"
    metrics = ["last_test_acc"] + (["last_val_acc"] if has_val else [])

    def seeds_of(variant: str) -> List[int]:
        if variant == "teacher" and teacher_seed is not None:  # one shared model, counted once
            return [teacher_seed if teacher_seed in by_variant["teacher"] else next(iter(by_variant["teacher"]))]
        return list(seeds)

    def values(variant: str, metric: str) -> List[float]:
        return [by_variant[variant][seed][metric] for seed in seeds_of(variant)]

    summaries = {}
    for variant in ["teacher", *variants]:
        if variant not in by_variant:
            continue
        present = [metric for metric in metrics if all(metric in by_variant[variant][seed]
                                                       for seed in seeds_of(variant))]
        summaries[variant] = {metric: summarize_values(values(variant, metric)).as_dict() for metric in present}
        summaries[variant]["epochs"] = by_variant[variant][seeds_of(variant)[0]].get("epochs")
        summaries[variant]["values"] = {metric: values(variant, metric) for metric in present}
        if published and variant in published:
            summaries[variant]["published_test_acc"] = published[variant]
    baselines = [v for v in variants if v not in SMSKD_VARIANTS]
    best = max(baselines, key=lambda v: summaries[v][selection]["mean"]) if baselines else None
    best_smskd = max((v for v in variants if v in SMSKD_VARIANTS), key=lambda v: summaries[v][selection]["mean"],
                     default=None)
    paired: Dict[str, Dict[str, Dict[str, Any]]] = {}
    if best is not None:
        for variant in variants:
            if variant != best:
                paired[variant] = {metric: paired_comparison(values(variant, metric), values(best, metric)).as_dict()
                                   for metric in metrics}
        for metric in metrics:  # one family per split: every comparison with the best baseline
            adjusted = holm([paired[variant][metric]["p_value"] for variant in paired])
            for variant, p_holm in zip(paired, adjusted):
                paired[variant][metric]["p_holm"] = p_holm
    return {"seeds": list(seeds), "variants": list(variants), "selection_metric": selection,
            "best_baseline": best, "best_smskd": best_smskd, "summaries": summaries, "paired": paired,
            "multiple_comparisons": "holm over the comparisons with the best baseline, per split",
            "rows": rows}


def _cell(summary: Dict[str, float]) -> str:
    if summary.get("low") is None:  # one value: no spread, no interval
        return f"{summary['mean']:6.2f} (n={summary['n']}, no interval)"
    return f"{summary['mean']:6.2f} +- {summary['std']:4.2f} [{summary['low']:6.2f}, {summary['high']:6.2f}]"


def format_report(analysis: Dict[str, Any]) -> str:
    """The study table: accuracy per variant with its 95% t-interval, and the paired comparison."""
    env = analysis.get("environment", {})
    lines = [f"{key}: {value}" for key, value in env.items()]
    seeds, best = analysis["seeds"], analysis["best_baseline"]
    split = "validation" if analysis["selection_metric"] == "last_val_acc" else "TEST (no validation split)"
    if analysis.get("teacher_seed") is not None:
        lines.append(f"teacher: one, trained with seed {analysis['teacher_seed']}, shared by every seed "
                     "(the intervals cover student seeds only)")
    lines += [f"seeds: {seeds}", f"best baseline (chosen on the {split} split): {best}",
              f"best SMSKD weighting (chosen on the same split): {analysis['best_smskd']}", "",
              "last-epoch accuracy %: mean +- sample std [95% t-interval of the mean]"]
    has_val = analysis["selection_metric"] == "last_val_acc"
    header = f"{'variant':<26}{'epochs':>7}  {'test':<33}" + (f"{'validation':<33}" if has_val else "")
    published = any("published_test_acc" in s for s in analysis["summaries"].values())
    lines += [header + ("published test" if published else ""), "-" * len(header)]
    for variant, summary in analysis["summaries"].items():
        line = f"{variant:<26}{summary['epochs'] or '':>7}  {_cell(summary['last_test_acc']):<33}"
        if has_val:
            line += f"{_cell(summary['last_val_acc']):<33}" if "last_val_acc" in summary else " " * 33
        if "published_test_acc" in summary:
            line += f"{summary['published_test_acc']:.2f}"
        lines.append(line.rstrip())
    if best is None:
        return "\n".join(lines + ["", "no baseline among the variants: no paired comparisons"]) + "\n"
    chosen = "val" if has_val else "test"
    lines += ["", f"paired against {best}, seed by seed: mean difference (points) [95% t-interval], "
              "paired t-test p (two-sided, unadjusted), Holm: p adjusted for the "
              f"{len(analysis['paired'])} comparisons with {best} on the same split",
              f"({chosen}: {best} was chosen as the best there, which favours it; "
              + ("test is the unbiased comparison)" if has_val else "no split is free of that choice)")]
    notes = []
    for variant, comparison in analysis["paired"].items():
        parts = []
        for metric, label in (("last_test_acc", "test"), ("last_val_acc", "val")):
            if metric in comparison:
                c = comparison[metric]
                if c["low"] is None:  # one seed
                    parts.append(f"{label} {c['mean']:+6.2f} (one seed: no interval, no test)")
                    continue
                part = f"{label} {c['mean']:+6.2f} [{c['low']:+6.2f}, {c['high']:+6.2f}] {format_p(c['p_value'])}"
                if c["p_value"] is not None:
                    holm_p = c.get("p_holm")
                    part += f" Holm {format_p(holm_p)[1:].lstrip('=')}" if holm_p is not None else ""
                else:
                    notes.append(f"{variant}, {label}: {c['note']}")
                parts.append(part)
        lines.append(f"{variant:<26}" + "   ".join(parts))
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot_study(analysis: Dict[str, Any], path: Path) -> Path:
    """PNG: every seed's test accuracy (dots) and the mean with its 95% t-interval per variant."""
    matplotlib = require_matplotlib(STUDY_PLOT)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in analysis["summaries"] if v != "teacher"]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    for position, name in enumerate(names):
        summary = analysis["summaries"][name]
        test = summary["last_test_acc"]
        color = "tab:red" if name in SMSKD_VARIANTS else ("tab:green" if name == analysis["best_baseline"]
                                                           else "tab:blue")
        axis.scatter([position] * len(summary["values"]["last_test_acc"]), summary["values"]["last_test_acc"],
                     s=12, color=color, alpha=0.5)
        if test["low"] is None:  # one value: no interval to draw
            axis.plot([position + 0.15], [test["mean"]], "o", color=color)
        else:
            axis.errorbar(position + 0.15, test["mean"], yerr=[[test["mean"] - test["low"]],
                                                               [test["high"] - test["mean"]]],
                          fmt="o", color=color, capsize=4)
    if "teacher" in analysis["summaries"]:
        axis.axhline(analysis["summaries"]["teacher"]["last_test_acc"]["mean"], color="grey", linestyle="--",
                     label="teacher (mean)")
        axis.legend(loc="lower right")
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names, rotation=35, ha="right")
    axis.set_ylabel("last-epoch test accuracy (%)")
    axis.set_title(f"{len(analysis['seeds'])} seeds; mean and 95% t-interval (green: best baseline, red: SMSKD)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
