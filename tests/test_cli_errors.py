"""Bad input at every entry point of the command line: one `error:` line naming the problem and the
way out, exit code 2 (1 for a run that fails), and no traceback unless --debug."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smskd_fast import cli
from smskd_fast.cli import main
from smskd_fast.training.config import ConfigError
from smskd_fast.training.models import build_model
from smskd_fast.training.checkpoint import save_model_file
from trainer_helpers import tiny_raw, write_teacher

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_input")
    teacher = write_teacher(folder / "teacher.pt")
    made = {"folder": folder, "teacher": teacher}

    def config(name, mutate=None, stages=None, **changes):
        raw = tiny_raw(teacher, stages or [{"method": "kd", "epochs": 1}, {"method": "sp", "epochs": 1}], **changes)
        if mutate:
            mutate(raw)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def model_file(name, arch, num_classes, in_channels, **entry):
        path = folder / f"{name}.pt"
        save_model_file(build_model(arch, num_classes, in_channels), arch, num_classes, in_channels, path)
        if entry:
            data = torch.load(path, weights_only=True)
            data.update(entry)
            torch.save(data, path)
        return path

    made["good"] = config("good")
    made["config"] = config
    made["model_file"] = model_file
    return made


def _teacher_file(files, path):
    return files["config"](path.stem + "_config", lambda raw: raw["teacher"].update(checkpoint=str(path)))


def _set(raw, *keys_and_value):
    *keys, value = keys_and_value
    node = raw
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


def _cifar_root(folder: Path, content: bytes) -> Path:
    root = folder / f"cifar_{len(content)}"
    (root / "cifar-100-python").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (root / "cifar-100-python" / split).write_bytes(content)
    return root


def _empty_class_folders(folder: Path) -> Path:
    root = folder / "imagefolder_empty"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True, exist_ok=True)
    return root


# (case, argv builder, exit code, what names the problem, what names the way out)
CASES = [
    ("config file missing", lambda f, t: ["train", "--config", str(t / "nope.yaml")],
     2, "config file", "give the path of a YAML run config"),
    ("config not YAML", lambda f, t: ["train", "--config", str(_write(t / "bad.yaml", "stages: [\n  - {method: kd"))],
     2, "is not valid YAML", "line"),
    ("config empty", lambda f, t: ["train", "--config", str(_write(t / "empty.yaml", ""))],
     2, "student: required key is missing", "student"),
    ("unknown key", lambda f, t: ["train", "--config", str(f["config"]("typo", lambda r: r["stages"][0].update(optimzer={})))],
     2, "stages[0].optimzer: unknown key", "expected one of ["),
    ("wrong type", lambda f, t: ["train", "--config", str(f["config"]("type", lambda r: r["stages"][0].update(epochs="ten")))],
     2, "stages[0].epochs: expected int, got str 'ten'", "expected int"),
    ("impossible lr", lambda f, t: ["train", "--config", str(f["config"]("lr", lambda r: _set(r, "defaults", "optimizer", "lr", -1)))],
     2, "stages[0].optimizer.lr: must be > 0, got -1", "must be > 0"),
    ("impossible batch size", lambda f, t: ["train", "--config", str(f["config"]("bs", lambda r: _set(r, "data", "batch_size", 0)))],
     2, "data.batch_size: must be >= 1", "must be >= 1"),
    ("unknown method", lambda f, t: ["train", "--config", str(f["config"]("method", stages=[{"method": "kdd", "epochs": 1}]))],
     2, "unknown method 'kdd'", "choose one of"),
    ("unknown layer", lambda f, t: ["train", "--config", str(f["config"]("layer", stages=[
        {"method": "kd", "epochs": 1}, {"method": {"name": "fitnet", "student_layers": ["nope"]}, "epochs": 1}]))],
     2, "student has no layer named 'nope'", "available layer names:"),
    ("unknown model", lambda f, t: ["train", "--config", str(f["config"]("model", lambda r: _set(r, "student", "name", "resnet9000")))],
     2, "unknown model 'resnet9000'", "choose one of"),
    ("unknown backend", lambda f, t: ["train", "--config", str(f["good"]), "--set", "backend=fastest", "--out", str(t / "r")],
     2, "backend must be 'auto' or one of", "set backend: auto"),
    ("unknown device", lambda f, t: ["train", "--config", str(f["good"]), "--device", "banana", "--out", str(t / "r")],
     2, "device: expected a torch device", "'cpu', 'cuda' or 'cuda:1'"),
    ("teacher file missing", lambda f, t: ["train", "--config", str(_teacher_file(f, t / "absent.pt"))],
     2, "absent.pt not found", "smskd-fast train-teacher"),
    ("teacher of another model", lambda f, t: ["train", "--config", str(_teacher_file(
        f, f["model_file"]("small", "digits_cnn_small", 10, 1)))],
     2, "holds model 'digits_cnn_small', but the config names 'digits_cnn_large'", "give a 'digits_cnn_large' model file"),
    ("teacher weights of another architecture", lambda f, t: ["train", "--config", str(_teacher_file(
        f, f["model_file"]("relabelled", "digits_cnn_small", 10, 1, model="digits_cnn_large")))],
     2, "relabelled.pt do not fit the model", "give a checkpoint of the model named in teacher.name"),
    ("teacher for another class count", lambda f, t: ["train", "--config", str(_teacher_file(
        f, f["model_file"]("c100", "digits_cnn_large", 100, 1)))],
     2, "has 100 classes, the data 10", "give a teacher trained on this data set"),
    ("teacher for another input", lambda f, t: ["train", "--config", str(_teacher_file(
        f, f["model_file"]("rgb", "digits_cnn_large", 10, 3)))],
     2, "takes 3-channel images, the data has 1", "give a teacher trained on this data set"),
    ("teacher not a torch file", lambda f, t: ["train", "--config", str(_teacher_file(f, _write(t / "garbage.pt", "not a checkpoint")))],
     2, "is not a readable model file", "smskd-fast train-teacher"),
    ("teacher a bare state dict", lambda f, t: ["train", "--config", str(_teacher_file(f, _save(
        t / "bare.pt", build_model("digits_cnn_large", 10, 1).state_dict())))],
     2, "is not a smskd-fast model file", "smskd-fast train-teacher"),
    ("cifar root without files", lambda f, t: ["train", "--config", str(f["good"]), "--set", "data.name=cifar100",
                                               "--data-dir", str(t), "--set", "student.name=resnet8x4"],
     2, "cifar-100-python/train not found", "torchvision.datasets.CIFAR100(root, download=True)"),
    ("cifar files of another format", lambda f, t: ["train", "--config", str(f["good"]), "--set", "data.name=cifar100",
                                                    "--data-dir", str(_cifar_root(t, pickle.dumps({"data": []})))],
     2, "is not in the expected format", "'fine_labels'"),
    ("cifar files not pickles", lambda f, t: ["train", "--config", str(f["good"]), "--set", "data.name=cifar100",
                                              "--data-dir", str(_cifar_root(t, b"\x00garbage"))],
     2, "is not in the expected format", "torchvision.datasets.CIFAR100"),
    ("cifar without data.root", lambda f, t: ["train", "--config", str(f["good"]), "--set", "data.name=cifar100"],
     2, "data.root (or --data-dir) is required", "--data-dir"),
    ("data root is a file", lambda f, t: ["train", "--config", str(f["good"]), "--set", "data.name=cifar100",
                                          "--data-dir", str(f["teacher"])],
     2, "is not a directory", "--data-dir DIR"),
    ("imagefolder without train", lambda f, t: ["train", "--config", str(f["good"]), "--set", "data.name=imagefolder",
                                                "--data-dir", str(t)],
     2, "train not found", "must hold train/ and test/"),
    ("imagefolder without images", lambda f, t: ["train", "--config", str(f["good"]), "--set", "data.name=imagefolder",
                                                 "--data-dir", str(_empty_class_folders(t))],
     2, "imagefolder_empty/train", "one folder of images per class"),
    ("--set without =", lambda f, t: ["train", "--config", str(f["good"]), "--set", "seed"],
     2, "--set 'seed': expected key.path=value", "key.path=value"),
    ("--set past a list", lambda f, t: ["train", "--config", str(f["good"]), "--set", "stages.5.epochs=1"],
     2, "stages.5 is not an index of a list of 2 items", "2 items"),
    ("--set value not YAML", lambda f, t: ["train", "--config", str(f["good"]), "--set", "stages.0.epochs=[1"],
     2, "--set value '[1' is not valid YAML", "YAML"),
    ("train without --config", lambda f, t: ["train"], 2, "--config FILE is required", "configs/digits_demo.yaml"),
    ("resume of a non-run", lambda f, t: ["train", "--resume", str(t)],
     2, "config.yaml not found", "smskd-fast train --config FILE --out"),
    ("resume with --config", lambda f, t: ["train", "--resume", str(t), "--config", str(f["good"])],
     2, "--resume continues a run with the config saved in its directory", "drop --config"),
    ("run directory in use", lambda f, t: ["train", "--config", str(f["good"]), "--out", str(_started_run(f, t))],
     2, "already holds a run", "use --resume or another --out"),
    ("resume with another student", lambda f, t: ["train", "--resume", str(_started_run(f, t)),
                                                  "--set", "student.name=digits_cnn_large"],
     2, "latest.pt do not fit", "resume with the run's own config"),
    ("eval of a non-run", lambda f, t: ["eval", str(t)], 2, "config.yaml not found", "eval needs the directory of a run"),
    ("eval of an unfinished run", lambda f, t: ["eval", str(_started_run(f, t))],
     2, "student.pt not found: a run writes it when it finishes", "smskd-fast train --resume"),
    ("eval on no device", lambda f, t: ["eval", str(_started_run(f, t)), "--device", "banana"],
     2, "--device 'banana'", "expected a device such as cpu, cuda or cuda:1"),
    ("eval on a device kind it cannot use", lambda f, t: ["eval", str(_started_run(f, t)), "--device", "meta"],
     2, "--device 'meta'", "expected a device such as cpu, cuda or cuda:1"),
    ("resume into another --out", lambda f, t: ["train", "--resume", str(_started_run(f, t)), "--out", str(t / "b")],
     2, "--resume continues the run in its own directory", "drop --out"),
    ("eval of another model", lambda f, t: ["eval", str(_started_run(f, t)), "--model-file", str(
        f["model_file"]("eval100", "digits_cnn_small", 100, 1))],
     2, "predicts 100 classes, the run's test data has 10", "trained on digits"),
    ("non-finite loss", lambda f, t: ["train", "--config", str(f["good"]), "--out", str(t / "r"),
                                      "--set", "defaults.optimizer.lr=1e30", "--set", "stages.0.epochs=3"],
     1, "the loss is", "nonfinite: skip"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _started_run(files, tmp_path) -> Path:
    run_dir = tmp_path / "started"
    if not (run_dir / "checkpoints" / "latest.pt").is_file():
        from smskd_fast.training.config import load_config
        from smskd_fast.training.trainer import SMSKDTrainer

        SMSKDTrainer(load_config(files["good"]), run_dir, log=lambda _: None).run(max_epochs=1)
    return run_dir


def assert_one_clear_line(arguments, capsys, code, problem, way_out) -> None:
    assert main(arguments) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert problem in lines[0] and way_out in lines[0], lines[0]
    with pytest.raises(BaseException):  # --debug lets the same error through, traceback and all
        main(["--debug", *arguments])


NEEDS_TORCHVISION = {"imagefolder without train", "imagefolder without images"}  # torchvision's ImageFolder reads


@pytest.mark.parametrize("case, argv, code, problem, way_out", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(files, tmp_path, capsys, case, argv, code, problem, way_out):
    if case in NEEDS_TORCHVISION:
        pytest.importorskip("torchvision")
    assert_one_clear_line(argv(files, tmp_path), capsys, code, problem, way_out)


# Optional packages (smskd_fast/training/optional_packages.py), each made unimportable as if not installed.
MISSING_PACKAGE_CASES = [
    ("imagefolder without torchvision", "torchvision",
     lambda f, t: ["train", "--config", str(f["good"]), "--set", "data.name=imagefolder", "--data-dir", str(t),
                   "--out", str(t / "r")],
     "data.name 'imagefolder' needs torchvision", f"the torchvision release built for torch {torch.__version__}"),
    ("torchvision model without torchvision", "torchvision",
     lambda f, t: ["train", "--config", str(f["config"]("torchvision_student", lambda raw: _set(
         raw, "student", "name", "torchvision:resnet18"))), "--out", str(t / "r")],
     "model 'torchvision:resnet18' needs torchvision", f"built for torch {torch.__version__}"),
    ("plots without matplotlib", "matplotlib",
     lambda f, t: ["train", "--config", str(f["good"]), "--set", "plots=true", "--out", str(t / "r")],
     "plots: true (the run's PNG plots; plots: false goes without) needs matplotlib", "pip install matplotlib"),
]


@pytest.mark.parametrize("case, package, argv, problem, way_out", MISSING_PACKAGE_CASES,
                         ids=[c[0] for c in MISSING_PACKAGE_CASES])
def test_a_missing_optional_package_is_named_before_training(files, tmp_path, capsys, monkeypatch, case, package,
                                                             argv, problem, way_out):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as for a package not installed
    assert_one_clear_line(argv(files, tmp_path), capsys, 2, problem, way_out)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # refused before the first epoch


def test_a_run_without_plots_needs_no_matplotlib(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["train", "--config", str(files["good"]), "--set", "plots=false", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "summary.json").is_file() and not list((tmp_path / "r").glob("*.png"))


def test_cuda_device_without_cuda(files, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error cannot happen here")
    assert main(["train", "--config", str(files["good"]), "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == ("error: device 'cuda': CUDA is not available on this machine; "
                                               "use --device cpu")


def test_eval_on_cuda_without_cuda(files, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error cannot happen here")
    assert main(["eval", str(_started_run(files, tmp_path)), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --device 'cuda': CUDA is not available on this machine; "
                                               "use --device cpu")


def test_argparse_mistakes_exit_2_with_usage(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["train", "--config", "x.yaml", "--sed", "3"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "error: unrecognized arguments: --sed 3" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["train", "--seed", "three"])
    assert "argument --seed: invalid int value: 'three'" in capsys.readouterr().err


def _cache_error(kind: str, folder: Path):
    """A real error of smskd_fast.training.logit_cache: a cache built for another run, or one with a damaged shard."""
    import dataclasses

    from smskd_fast.training.logit_cache import CacheSpec, LogitCache, build

    spec = CacheSpec(model_hash="teacher-a", data_fingerprint="data", augmentation_seed=0, epochs=(0,),
                     num_samples=8, num_classes=5, shard_rows=4)
    cache = LogitCache.create_or_resume(folder, spec)
    build(cache, lambda epoch, first, count: (torch.randn(count, 5), torch.zeros(count, dtype=torch.long)))
    if kind == "mismatch":
        LogitCache.open(folder, dataclasses.replace(spec, model_hash="teacher-b"))
    shard = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "header.json" and
                   not p.name.endswith((".sha256", ".json")))[0]
    shard.write_bytes(shard.read_bytes()[:-3])
    LogitCache.open(folder, spec).read(0, range(8))


@pytest.mark.parametrize("kind, code, problem, way_out", [
    ("mismatch", 2, "was built with model_hash='teacher-a' but this run needs 'teacher-b'",
     "point the run at another cache directory or rebuild this one"),
    ("corrupted", 1, "logit cache shard", "cache"),
])
def test_cache_errors_are_shown_cleanly(monkeypatch, tmp_path, capsys, kind, code, problem, way_out):
    monkeypatch.setattr(cli, "_train", lambda args: _cache_error(kind, tmp_path / "cache"))
    assert main(["train"]) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert problem in lines[0] and way_out in lines[0], lines[0]


def test_an_unexpected_error_points_to_debug(monkeypatch, capsys):
    def crash(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_train", crash)
    assert main(["train"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: unexpected ZeroDivisionError: division by zero (this is probably a bug in smskd-fast; "
        "rerun with --debug for the traceback and report it)")
    with pytest.raises(ZeroDivisionError):
        main(["train", "--debug"])


def test_the_installed_entry_point_hides_the_traceback_unless_debug(tmp_path):
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "smskd_fast", "train", "--config", str(tmp_path / "missing.yaml")]
    plain = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip().startswith("error: config file") and "Traceback" not in plain.stderr
    debug = subprocess.run(command + ["--debug"], capture_output=True, text=True, env=environment, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError: config file" in debug.stderr


def test_exponent_numbers_without_a_dot_are_numbers():
    """YAML 1.1 reads `1e-3` as a string; a float setting takes it as the number it means."""
    from smskd_fast.training.config import apply_overrides, parse_config

    raw = apply_overrides(tiny_raw(Path("t.pt"), [{"method": "kd", "epochs": 1}]),
                          ["defaults.optimizer.lr=1e-3", "defaults.temperature=4E0"])
    stage = parse_config(raw).stages[0]
    assert stage.optimizer.lr == 1e-3 and stage.temperature == 4.0
    with pytest.raises(ConfigError, match=r"stages\[0\].epochs: expected int, got str '1e3'"):
        parse_config(apply_overrides(raw, ["stages.0.epochs=1e3"]))


def test_ctrl_c_during_training_says_how_to_resume(files, tmp_path, monkeypatch, capsys):
    from smskd_fast.training.trainer import SMSKDTrainer

    def interrupted(self, resume=False, max_epochs=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(SMSKDTrainer, "run", interrupted)
    out = tmp_path / "r"
    assert main(["train", "--config", str(files["good"]), "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip() == (f"error: interrupted; continue from the last finished epoch with "
                                               f"`smskd-fast train --resume {out}`")
