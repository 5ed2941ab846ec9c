"""The smskd-fast command line: train, train-teacher, eval, demo, cache build, bench.

Errors the user can fix (a bad config, argument, file or data directory) print one
`error: ...` line and exit with code 2; a run that fails (a non-finite loss, a full
disk, a corrupted cache) exits with code 1. No traceback is shown unless --debug.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


__all__ = ["main"]

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "glyphs_demo.yaml"  # shipped in the wheel; the quick
# smoke is --config configs/digits_demo.yaml


def _add_config_options(parser: argparse.ArgumentParser, default_out: str = "runs/<config name>") -> None:
    parser.add_argument("--config", type=Path, help="YAML run config")
    parser.add_argument("--out", type=Path, help=f"run directory (default: {default_out})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override any config value (repeatable), e.g. --set stages.0.epochs=3")
    parser.add_argument("--seed", type=int, help="shorthand for --set seed=N")
    parser.add_argument("--device", help="shorthand for --set device=D (cpu, cuda, cuda:1)")
    parser.add_argument("--data-dir", help="shorthand for --set data.root=DIR")


def _overrides(args: argparse.Namespace) -> List[str]:
    overrides = list(args.overrides)
    for flag, key in (("seed", "seed"), ("device", "device"), ("data_dir", "data.root")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


def _load(args: argparse.Namespace):
    from smskd_fast.training.config import load_config

    if args.config is None:
        raise UsageError("--config FILE is required (e.g. --config configs/digits_demo.yaml)")
    return load_config(args.config, _overrides(args))


def _default_out(args: argparse.Namespace, suffix: str = "") -> Path:
    return args.out or Path("runs") / (args.config.stem + suffix)


def _train(args: argparse.Namespace) -> int:
    from smskd_fast.training.config import load_config
    from smskd_fast.training.atomic_io import CheckpointWriteError
    from smskd_fast.training.trainer import SMSKDTrainer

    if args.resume is not None:
        run_dir = args.resume
        if args.config is not None:
            raise UsageError("--resume continues a run with the config saved in its directory; drop --config "
                             "(change values with --set)")
        if args.out is not None and args.out != run_dir:
            raise UsageError(f"--resume continues the run in its own directory {run_dir}; drop --out {args.out}")
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise UsageError(f"{config_file} not found: --resume needs a run directory that a started run wrote; "
                             f"start one with `smskd-fast train --config FILE --out {run_dir}`")
        config = load_config(config_file, _overrides(args))
    else:
        config, run_dir = _load(args), _default_out(args)
    trainer = SMSKDTrainer(config, run_dir)
    try:
        summary = trainer.run(resume=args.resume is not None)
    except CheckpointWriteError as error:
        raise CheckpointWriteError(f"{error}. Free some space, then continue with "
                                   f"`smskd-fast train --resume {run_dir}`") from error
    except KeyboardInterrupt:
        raise UsageError(f"interrupted; continue from the last finished epoch with "
                         f"`smskd-fast train --resume {run_dir}`", exit_code=130) from None
    if not trainer.dist.is_main:  # under torchrun, rank 0 reports
        return 0
    print(f"run directory: {run_dir}")
    print(f"test accuracy: last epoch {summary['last_test_acc']:.2f}%, "
          f"best epoch {summary['best_test_acc']:.2f}% (epoch {summary['best_global_epoch']})")
    return 0


def _train_teacher(args: argparse.Namespace) -> int:
    from smskd_fast.training.experiments import teacher_config
    from smskd_fast.training.trainer import SMSKDTrainer

    config = _load(args)
    run_dir = _default_out(args, "_teacher")
    trainer = SMSKDTrainer(teacher_config(config), run_dir)
    summary = trainer.run()
    if not trainer.dist.is_main:
        return 0
    print(f"teacher test accuracy: last epoch {summary['last_test_acc']:.2f}%, best {summary['best_test_acc']:.2f}%")
    print(f"teacher weights: {run_dir / 'student.pt'}  (use --set teacher.checkpoint={run_dir / 'student.pt'})")
    return 0


def _device_here(name: str):
    """torch.device(name), refused with a UsageError when it is no device name or not on this machine."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: expected a device such as cpu, cuda or cuda:1")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _eval(args: argparse.Namespace) -> int:
    from smskd_fast.training.config import load_config
    from smskd_fast.training.data import load_splits
    from smskd_fast.training.models import build_model
    from smskd_fast.training.checkpoint import load_model_file, load_weights
    from smskd_fast.training.evaluation import evaluate

    if not (args.run_dir / "config.yaml").is_file():
        raise UsageError(f"{args.run_dir / 'config.yaml'} not found: eval needs the directory of a run "
                         "(written by `smskd-fast train`)")
    device = _device_here(args.device or "cpu")
    config = load_config(args.run_dir / "config.yaml")
    model_file = args.model_file or args.run_dir / "student.pt"
    if args.model_file is None and not model_file.is_file():
        raise UsageError(f"{model_file} not found: a run writes it when it finishes; continue this one with "
                         f"`smskd-fast train --resume {args.run_dir}`")
    entry = load_model_file(model_file)
    test = load_splits(config.data.name, args.data_dir or config.data.root, config.data.image_size,
                       config.data.context_length).test
    test = test.subset(config.data.test_subset)
    if entry["num_classes"] != test.num_classes:
        raise UsageError(f"{model_file} predicts {entry['num_classes']} classes, the run's test data has "
                         f"{test.num_classes}; give a model file trained on {config.data.name}")
    model = build_model(entry["model"], entry["num_classes"], entry["in_channels"])
    load_weights(model, entry["state_dict"], str(model_file))
    result = evaluate(model.to(device), test, config.data.eval_batch_size, device)
    report = {"model_file": str(model_file), "test_acc": result["acc"], "test_loss": result["loss"]}
    if "perplexity" in result:
        report["test_perplexity"] = result["perplexity"]
    print(json.dumps(report))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from smskd_fast.training.config import load_config
    from smskd_fast.training.experiments import ALL_VARIANTS, DEMO_VARIANTS, format_table, run_variants

    config_file = args.config or DEMO_CONFIG
    config = load_config(config_file, _overrides(args))
    out = args.out or Path("runs") / "demo" / Path(config_file).stem  # one folder per config: runs are reused
    names = ALL_VARIANTS if args.all_variants else DEMO_VARIANTS
    seeds = args.seeds or [config.seed]
    rows = run_variants(config, out, names, seeds)
    table = format_table(rows)
    print(f"\nTest accuracy on {config.data.name} ({config_file}; runs in {out}):\n{table}")
    if len(seeds) < 5:
        print("One seed decides little; `smskd-fast study` compares every variant over "
              "seeds with intervals and paired tests (what it found: docs/results.md).")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "table.txt").write_text(table + "\n")
    return 0


def _study(args: argparse.Namespace) -> int:
    from smskd_fast.training.study import format_report, run_study

    config = _load(args)
    out = args.out or _default_out(args, "_study")
    analysis = run_study(config, out, args.seeds, args.variants, args.jobs,
                         command="smskd-fast " + " ".join(sys.argv[1:]), teacher_seed=args.teacher_seed)
    print(f"\n{format_report(analysis)}\nwritten: {out / 'study.txt'}, study.json, study.png, configs/")
    return 0


def _cache_build(args: argparse.Namespace) -> int:
    """Builds (or finishes) the config's teacher logit cache, so that the run only reads it."""
    import torch

    from smskd_fast.training.frozen_logits import open_or_build, teacher_cache_spec
    from smskd_fast.training.trainer import SMSKDTrainer

    config = _load(args)
    if config.cache is None or config.cache.teacher is None:
        raise ValueError("cache.teacher: the config has no teacher cache to build (add cache: {teacher: {dir: ...}})")
    trainer = SMSKDTrainer(config, Path("."), log=lambda _: None)  # loads the data and the frozen teacher
    store = config.cache.teacher
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        cache, written = open_or_build(Path(store.dir), teacher_cache_spec(config, trainer.teacher, trainer.data.train),
                                       trainer.teacher, trainer.data.train, config, store.batch_size, trainer.device)
    finally:
        torch.set_num_threads(threads)
    spec = cache.spec
    shards = sum(1 for _ in spec.shards())
    epochs = ("one view per sample (no augmentation), serving every epoch" if spec.epoch_invariant
              else f"epochs 0..{max(spec.epochs)}")
    tokens = f" x {spec.sequence_length} tokens" if spec.sequence_length else ""
    print(f"teacher logit cache {store.dir}: {shards} shards ({written} written now, {shards - written} reused), "
          f"{spec.format} {spec.dtype}, {epochs}, {spec.num_samples} samples{tokens}")
    return 0


def _bench(argv: List[str]) -> int:
    from smskd_fast.bench import quick as bench  # imported lazily: benchmarks need nothing from the trainer

    return bench.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smskd-fast", description="Sequential multi-stage knowledge distillation")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common = argparse.ArgumentParser(add_help=False)  # --debug is accepted after the command too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a student (all stages of a config)", parents=[common])
    _add_config_options(train)
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from latest.pt")
    teacher = commands.add_parser("train-teacher", help="train the config's teacher alone (CE only)",
                                  parents=[common])
    _add_config_options(teacher, default_out="runs/<config name>_teacher")
    evaluation = commands.add_parser("eval", help="test accuracy of a run's final student (or --model-file)",
                                     parents=[common])
    evaluation.add_argument("run_dir", type=Path)
    evaluation.add_argument("--model-file", type=Path)
    evaluation.add_argument("--data-dir")
    evaluation.add_argument("--device")
    demo = commands.add_parser("demo", help="glyphs demo: teacher, student alone, KD, SMSKD; prints a table "
                                            "(--config configs/digits_demo.yaml: the quick digits one)",
                               parents=[common])
    _add_config_options(demo, default_out="runs/demo/<config name>")
    demo.add_argument("--seeds", type=int, nargs="+", help="seeds to average over (default: the config's)")
    demo.add_argument("--all-variants", action="store_true",
                      help="also summed methods, sequential without reference, short KD and every weighting")
    study = commands.add_parser("study", help="every baseline and SMSKD variant over seeds, with statistics "
                                              "(resumable; see smskd_fast/training/study.py)", parents=[common])
    _add_config_options(study, default_out="runs/<config name>_study")
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default: 0 1 2 3 4)")
    study.add_argument("--jobs", type=int, default=1, help="parallel training processes (default 1)")
    study.add_argument("--variants", nargs="+", help="a subset of the variants (default: all of them)")
    study.add_argument("--teacher-seed", type=int, help="one teacher, trained with this seed, for every seed "
                                                         "(default: each seed trains its own)")
    cache = commands.add_parser("cache", help="frozen-model logit caches")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    cache_build = cache_commands.add_parser("build", help="build the config's teacher logit cache ahead of a run "
                                                          "(resumable after a kill)", parents=[common])
    _add_config_options(cache_build)
    commands.add_parser("bench", help="loss backend benchmark (smskd_fast.bench.quick)", add_help=False)
    return parser


class UsageError(Exception):
    """A command-line mistake with its way out; exit_code 2 unless given."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _exit_code(error: BaseException) -> Optional[int]:
    """2 for input the user can fix, 1 for a run that failed, None for an unexpected error (a bug)."""
    from smskd_fast.training.logit_cache import CacheCorruptedError
    from smskd_fast.training.nonfinite import NonFiniteLossError
    from smskd_fast.training.atomic_io import CheckpointWriteError
    from smskd_fast.training.optional_packages import MissingPackageError

    if isinstance(error, UsageError):
        return error.exit_code
    if isinstance(error, MissingPackageError):  # a package to install, named in the message
        return 2
    if isinstance(error, (NonFiniteLossError, CheckpointWriteError, CacheCorruptedError)):
        return 1
    if isinstance(error, (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                          IsADirectoryError, PermissionError)):  # bad config, arguments, files, names
        return 2
    if isinstance(error, OSError):
        return 1
    return None


def _message(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    handlers = {"train": _train, "train-teacher": _train_teacher, "eval": _eval, "demo": _demo,
                "cache": _cache_build, "study": _study}
    try:
        return handlers[args.command](args)
    except (Exception, KeyboardInterrupt) as error:
        if args.debug:
            raise
        if isinstance(error, KeyboardInterrupt):
            print("error: interrupted", file=sys.stderr)
            return 130
        code = _exit_code(error)
        if code is None:
            print(f"error: unexpected {type(error).__name__}: {_message(error)} (this is probably a bug in "
                  "smskd-fast; rerun with --debug for the traceback and report it)", file=sys.stderr)
            return 1
        print(f"error: {_message(error)}", file=sys.stderr)
        return code
