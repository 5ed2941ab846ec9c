"""Comparison runs built from one SMSKD config: the teacher, baselines and SMSKD variants.

Every baseline gets the same total number of epochs as the SMSKD stages together
(except kd_short, one stage's length), so that SMSKD's longer training is not
mistaken for a gain of the method.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from smskd_fast.training.config import ConfigError, MethodConfig, RunConfig, StageConfig
from smskd_fast.training.config_record import changes_since_written
from smskd_fast.training.trainer import SMSKDTrainer

__all__ = ["teacher_config", "variant_configs", "single_method_variants", "train_teacher", "run_variants", "format_table",
           "DEMO_VARIANTS", "ALL_VARIANTS", "run_or_resume", "refuse_another_config"]

DEMO_VARIANTS = ("student_alone", "kd", "smskd")
ALL_VARIANTS = ("student_alone", "kd_short", "kd", "summed", "sequential_no_reference",
                "smskd", "smskd_tcp", "smskd_constant")


def teacher_config(config: RunConfig) -> RunConfig:
    """The run that trains config.teacher alone (CE only) with config.teacher_training."""
    if config.teacher is None:
        raise ValueError("the config has no teacher to train")
    if config.teacher_training is not None:
        stage = copy.deepcopy(config.teacher_training)
    else:
        first = config.stages[0]
        stage = StageConfig(methods=[MethodConfig(name="none")], epochs=sum(s.epochs for s in config.stages),
                            optimizer=copy.deepcopy(first.optimizer), schedule=copy.deepcopy(first.schedule))
    stage.name = "teacher"
    return _replace(config, student=copy.deepcopy(config.teacher), teacher=None, stages=[stage],
                    teacher_training=None, cache=None)  # no frozen model: nothing to cache


def _replace(config: RunConfig, **changes: Any) -> RunConfig:
    updated = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(updated, key, value)
    return updated


def _single_stage(config: RunConfig, methods, epochs: int, name: str, source: int = 0, **changes: Any) -> RunConfig:
    """One stage of `epochs` with the settings (optimizer, schedule, weights, T) of stage `source`."""
    stage = copy.deepcopy(config.stages[source])
    stage.methods, stage.epochs, stage.name = copy.deepcopy(methods), epochs, name
    for key, value in changes.items():
        setattr(stage, key, value)
    return _replace(config, stages=[stage])


def variant_configs(config: RunConfig, teacher_checkpoint: str, names: Sequence[str]) -> Dict[str, RunConfig]:
    """The named comparison runs (see ALL_VARIANTS) of an SMSKD config."""
    config = _replace(config, teacher=_replace(config.teacher, checkpoint=teacher_checkpoint))
    total = sum(stage.epochs for stage in config.stages)
    all_methods = [method for stage in config.stages for method in stage.methods if method.name != "none"]
    configured_kd = [method for method in all_methods if method.name == "kd"]
    kd = configured_kd[:1] or [MethodConfig(name="kd")]  # the KD baseline uses the config's KD weight
    builders: Dict[str, Callable[[], RunConfig]] = {
        # CE alone at weight 1 (a stage's ce_weight such as KD's 0.1 belongs to that stage's recipe)
        "student_alone": lambda: _single_stage(config, [MethodConfig(name="none")], total, "student_alone",
                                               ce_weight=1.0),
        "kd_short": lambda: _single_stage(config, kd, config.stages[0].epochs, "kd_short", _source(config, "kd")),
        "kd": lambda: _single_stage(config, kd, total, "kd", _source(config, "kd")),
        "summed": lambda: _single_stage(config, all_methods, total, "summed"),
        "sequential_no_reference": lambda: _with_stages(config, reference=False),
        "smskd": lambda: _with_stages(config, weighting="inverse_tcp"),
        "smskd_tcp": lambda: _with_stages(config, weighting="tcp"),
        "smskd_constant": lambda: _with_stages(config, weighting="constant"),
    }
    for method in all_methods:  # each configured method alone, e.g. only_fitnet (KD alone is "kd")
        builders.setdefault(f"only_{method.name}", _single_method(config, all_methods, method.name, total))
    unknown = [name for name in names if name not in builders]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {list(builders)}")
    return {name: builders[name]() for name in names}


def _source(config: RunConfig, name: str) -> int:
    """The index of the first stage that uses method `name` (0 when none does)."""
    return next((i for i, stage in enumerate(config.stages) if any(m.name == name for m in stage.methods)), 0)


def _single_method(config: RunConfig, methods, name: str, epochs: int) -> Callable[[], RunConfig]:
    """One method alone (its first configured entry) for all epochs, with its stage's settings."""
    first = [next(method for method in methods if method.name == name)]
    return lambda: _single_stage(config, first, epochs, f"only_{name}", _source(config, name))


def single_method_variants(config: RunConfig) -> List[str]:
    """The variant names of the config's methods alone: "kd" and only_<method> for the others."""
    names = dict.fromkeys(m.name for stage in config.stages for m in stage.methods if m.name != "none")
    return ["kd" if name == "kd" else f"only_{name}" for name in names]


def _with_stages(config: RunConfig, **changes: Any) -> RunConfig:
    stages = copy.deepcopy(config.stages)
    for stage in stages:
        for key, value in changes.items():
            setattr(stage, key, value)
    return _replace(config, stages=stages)


def _quiet(_: str) -> None:
    pass


def refuse_another_config(config: RunConfig, run_dir: Path) -> None:
    """Raises ConfigError when run_dir holds a run (finished or not) of other values than config's:
    its results must not pass for this config's, nor its checkpoints be resumed under it."""
    changes = changes_since_written(run_dir, config)
    if changes:
        shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
        raise ConfigError(f"{run_dir} holds a run of another config ({shown}): choose another --out, "
                          f"or remove {run_dir} to train it with this config")


def train_teacher(config: RunConfig, out: Path, log: Callable[[str], None] = print) -> Path:
    """Trains the teacher into out (reusing a finished one of the same config there); returns its model file."""
    model_file = Path(out) / "student.pt"
    teacher = teacher_config(config)
    if model_file.is_file():
        refuse_another_config(teacher, Path(out))
    else:
        run_or_resume(teacher, Path(out), log)
    return model_file


def run_or_resume(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> Dict[str, Any]:
    """The run's summary: read when finished, resumed when interrupted, trained otherwise; refused
    when run_dir holds a run of another config."""
    refuse_another_config(config, run_dir)
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    resume = (run_dir / "checkpoints" / "latest.pt").is_file()
    return SMSKDTrainer(config, run_dir, log=log).run(resume=resume)


def run_variants(config: RunConfig, out: Path, names: Sequence[str], seeds: Sequence[int],
                 log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Trains a teacher per seed and every named variant; returns one result row per (variant, seed)."""
    rows = []
    for seed in seeds:
        seeded = _replace(config, seed=seed, progress=False)
        started = time.monotonic()
        teacher_file = train_teacher(seeded, out / f"seed{seed}" / "teacher", log=_quiet)
        teacher_summary = json.loads((out / f"seed{seed}" / "teacher" / "summary.json").read_text())
        rows.append({"variant": "teacher", "seed": seed, "last_test_acc": teacher_summary["last_test_acc"],
                     "best_test_acc": teacher_summary["best_test_acc"], "epochs": teacher_summary["epochs"],
                     "seconds": time.monotonic() - started})
        log(f"seed {seed}: teacher {rows[-1]['last_test_acc']:.2f}%")
        for name, variant in variant_configs(seeded, str(teacher_file), names).items():
            started = time.monotonic()
            summary = run_or_resume(variant, out / f"seed{seed}" / name, _quiet)
            rows.append({"variant": name, "seed": seed, "last_test_acc": summary["last_test_acc"],
                         "best_test_acc": summary["best_test_acc"], "epochs": summary["epochs"],
                         "seconds": time.monotonic() - started})
            log(f"seed {seed}: {name} {summary['last_test_acc']:.2f}%")
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Test accuracy per variant: mean and sample standard deviation over seeds (last and best epoch)."""
    import statistics

    lines = [f"{'run':<26}{'seeds':>6}{'epochs':>8}{'last-epoch acc %':>22}{'best-epoch acc %':>22}",
             "-" * 84]
    for variant in dict.fromkeys(row["variant"] for row in rows):
        group = [row for row in rows if row["variant"] == variant]
        cells = []
        for key in ("last_test_acc", "best_test_acc"):
            values = [row[key] for row in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} +- {spread:.2f}" if len(values) > 1
                         else f"{values[0]:.2f}")
        lines.append(f"{variant:<26}{len(group):>6}{group[0]['epochs']:>8}{cells[0]:>22}{cells[1]:>22}")
    return "\n".join(lines)
