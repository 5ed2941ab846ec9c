"""The smskd-fast command line: train, train-teacher, eval, demo, bench."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import yaml

__all__ = ["main"]

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "digits_demo.yaml"  # shipped in the wheel


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML run config")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<config name>)")
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
    from .config import load_config

    if args.config is None:
        raise SystemExit("error: --config FILE is required")
    return load_config(args.config, _overrides(args))


def _default_out(args: argparse.Namespace, suffix: str = "") -> Path:
    return args.out or Path("runs") / (args.config.stem + suffix)


def _train(args: argparse.Namespace) -> int:
    from .config import apply_overrides, parse_config
    from .stages import SMSKDTrainer

    if args.resume is not None:
        run_dir = args.resume
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise SystemExit(f"error: {config_file} not found: --resume needs a run directory")
        config = parse_config(apply_overrides(yaml.safe_load(config_file.read_text()), _overrides(args)))
    else:
        config, run_dir = _load(args), _default_out(args)
    trainer = SMSKDTrainer(config, run_dir)
    summary = trainer.run(resume=args.resume is not None)
    if not trainer.dist.is_main:  # under torchrun, rank 0 reports
        return 0
    print(f"run directory: {run_dir}")
    print(f"test accuracy: last epoch {summary['last_test_acc']:.2f}%, "
          f"best epoch {summary['best_test_acc']:.2f}% (epoch {summary['best_global_epoch']})")
    return 0


def _train_teacher(args: argparse.Namespace) -> int:
    from .experiments import teacher_config
    from .stages import SMSKDTrainer

    config = _load(args)
    run_dir = _default_out(args, "_teacher")
    trainer = SMSKDTrainer(teacher_config(config), run_dir)
    summary = trainer.run()
    if not trainer.dist.is_main:
        return 0
    print(f"teacher test accuracy: last epoch {summary['last_test_acc']:.2f}%, best {summary['best_test_acc']:.2f}%")
    print(f"teacher weights: {run_dir / 'student.pt'}  (use --set teacher.checkpoint={run_dir / 'student.pt'})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .config import parse_config
    from .data import load_splits
    from .models import build_model
    from .runio import load_model_file
    from .stages import evaluate

    config = parse_config(yaml.safe_load((args.run_dir / "config.yaml").read_text()))
    model_file = args.model_file or args.run_dir / "student.pt"
    entry = load_model_file(model_file)
    test = load_splits(config.data.name, args.data_dir or config.data.root, config.data.image_size,
                       config.data.context_length).test
    test = test.subset(config.data.test_subset)
    model = build_model(entry["model"], entry["num_classes"], entry["in_channels"])
    model.load_state_dict(entry["state_dict"])
    device = torch.device(args.device or "cpu")
    result = evaluate(model.to(device), test, config.data.eval_batch_size, device)
    report = {"model_file": str(model_file), "test_acc": result["acc"], "test_loss": result["loss"]}
    if "perplexity" in result:
        report["test_perplexity"] = result["perplexity"]
    print(json.dumps(report))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .config import load_config
    from .experiments import ALL_VARIANTS, DEMO_VARIANTS, format_table, run_variants

    config_file = args.config or DEMO_CONFIG
    config = load_config(config_file, _overrides(args))
    out = args.out or Path("runs") / "demo"
    names = ALL_VARIANTS if args.all_variants else DEMO_VARIANTS
    seeds = args.seeds or [config.seed]
    rows = run_variants(config, out, names, seeds)
    table = format_table(rows)
    print(f"\nTest accuracy on {config.data.name} ({config_file}; runs in {out}):\n{table}")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "table.txt").write_text(table + "\n")
    return 0


def _bench(argv: List[str]) -> int:
    from . import bench  # imported lazily: benchmarks need nothing from the trainer

    return bench.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smskd-fast", description="Sequential multi-stage knowledge distillation")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a student (all stages of a config)")
    _add_config_options(train)
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from latest.pt")
    teacher = commands.add_parser("train-teacher", help="train the config's teacher alone (CE only)")
    _add_config_options(teacher)
    evaluation = commands.add_parser("eval", help="test accuracy of a run's final student (or --model-file)")
    evaluation.add_argument("run_dir", type=Path)
    evaluation.add_argument("--model-file", type=Path)
    evaluation.add_argument("--data-dir")
    evaluation.add_argument("--device")
    demo = commands.add_parser("demo", help="digits demo: teacher, student alone, KD, SMSKD; prints a table")
    _add_config_options(demo)
    demo.add_argument("--seeds", type=int, nargs="+", help="seeds to average over (default: the config's)")
    demo.add_argument("--all-variants", action="store_true",
                      help="also summed methods, sequential without reference, short KD and every weighting")
    commands.add_parser("bench", help="loss backend benchmark (smskd_fast.bench)", add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    handlers = {"train": _train, "train-teacher": _train_teacher, "eval": _eval, "demo": _demo}
    try:
        return handlers[args.command](args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as error:  # bad config, files or names
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
