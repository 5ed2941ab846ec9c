"""backend="auto" on CUDA tensors: the measured cuda-vs-triton choice (runs on the CPU)."""
import json

import pytest
import torch

from smskd_fast.backends import gpu_choice, registry

GPU = "NVIDIA Test GPU"


@pytest.fixture
def measured_table(tmp_path, monkeypatch):
    """A table where cuda wins below C=4096 for bf16 and triton at and above it."""
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"devices": {GPU: {"bfloat16": {"1024": "cuda", "4096": "triton", "65536": "triton"}}}}))
    monkeypatch.setenv("SMSKD_FAST_GPU_CHOICE_TABLE", str(path))
    monkeypatch.delenv("SMSKD_FAST_GPU_BACKEND", raising=False)
    monkeypatch.setattr(gpu_choice, "_device_name", lambda index: GPU)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gpu_choice.load_table.cache_clear()
    yield path
    gpu_choice.load_table.cache_clear()


def test_chooser_is_registered_for_cuda_tensors():
    assert registry._CHOOSERS["cuda"] is gpu_choice.choose_gpu_backend


@pytest.mark.parametrize(
    "num_classes, expected",
    [(10, "cuda"), (1024, "cuda"), (1500, "cuda"), (3000, "triton"), (4096, "triton"), (250000, "triton")],
)
def test_nearest_measured_c_in_log_scale_wins(measured_table, num_classes, expected):
    candidates = ["cuda", "triton", "reference"]
    assert gpu_choice.choose_gpu_backend(candidates, torch.bfloat16, num_classes) == expected


def test_unmeasured_dtype_or_gpu_takes_cuda(measured_table, monkeypatch):
    candidates = ["triton", "cuda", "reference"]
    assert gpu_choice.choose_gpu_backend(candidates, torch.float16, 8192) == "cuda"
    monkeypatch.setattr(gpu_choice, "_device_name", lambda index: "another GPU")
    assert gpu_choice.choose_gpu_backend(candidates, torch.bfloat16, 8192) == "cuda"


def test_environment_forces_a_backend(measured_table, monkeypatch):
    monkeypatch.setenv("SMSKD_FAST_GPU_BACKEND", "triton")
    assert gpu_choice.choose_gpu_backend(["cuda", "triton", "reference"], torch.bfloat16, 100) == "triton"


@pytest.mark.parametrize(
    "candidates, expected",
    [(["cuda", "reference"], "cuda"), (["triton", "reference"], "triton"), (["reference"], "reference")],
)
def test_works_with_one_or_no_gpu_backend(measured_table, candidates, expected):
    # A measured winner that is not available is never returned.
    assert gpu_choice.choose_gpu_backend(candidates, torch.bfloat16, 100000) == expected


def test_missing_table_is_empty(tmp_path):
    assert gpu_choice.load_table(str(tmp_path / "absent.json")) == {}


@pytest.mark.parametrize("timings, expected", [
    ({"cuda": 1.0, "triton": 0.5}, "triton"),       # clearly faster: chosen
    ({"cuda": 1.04, "triton": 1.0}, "cuda"),        # within the tie margin: the default stays
    ({"cuda": 0.9, "triton": 1.0}, "cuda"),
    ({"triton": 1.0}, "triton"),                    # the default unmeasured
])
def test_pick_winner_keeps_the_default_on_a_tie(timings, expected):
    assert gpu_choice.pick_winner(timings) == expected


def test_shipped_table_is_a_real_measurement_and_package_data():
    """The committed table names a measured GPU and its source, and pyproject ships it."""
    import fnmatch
    import os

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(gpu_choice.TABLE_PATH) as f:
        shipped = json.load(f)
    assert shipped["devices"], "no measured GPU in the shipped table"
    for device, by_dtype in shipped["devices"].items():
        assert shipped["measured"][device]["source"], device
        for winners in by_dtype.values():
            assert set(winners.values()) <= set(gpu_choice.GPU_BACKENDS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["smskd_fast"]
    relative = os.path.relpath(gpu_choice.TABLE_PATH, os.path.join(root, "smskd_fast"))
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), patterns


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_choice_traces_without_graph_breaks(measured_table, dynamic):
    """torch.compile(fullgraph=True) of code that resolves backend="auto" on a GPU: the table lookup runs
    eagerly at trace time (a file, the GPU's name) and C is only compared, so it traces, symbolic C too."""
    candidates = ["cuda", "triton", "reference"]

    def scaled_by_choice(x):
        return x * (1.0 if gpu_choice.choose_gpu_backend(candidates, x.dtype, x.shape[-1]) == "cuda" else 2.0)

    torch._dynamo.reset()
    compiled = torch.compile(scaled_by_choice, fullgraph=True, dynamic=dynamic, backend="eager")
    for num_classes in (10, 1500, 3000, 250000, 1024):
        x = torch.ones(2, num_classes, dtype=torch.bfloat16)
        expected = 1.0 if gpu_choice.choose_gpu_backend(candidates, torch.bfloat16, num_classes) == "cuda" else 2.0
        assert compiled(x)[0, 0].item() == expected, num_classes


def test_the_choice_follows_the_gpu_the_inputs_are_on(measured_table, monkeypatch):
    """A machine with two GPU models: a tensor on cuda:1 gets cuda:1's measured winner, whatever the current
    device is (the current device's name was looked up, so cuda:1's inputs got cuda:0's table)."""
    monkeypatch.setattr(gpu_choice, "_device_name", lambda index: {0: "an unmeasured GPU", 1: GPU}[index])
    candidates = ["cuda", "triton", "reference"]
    assert gpu_choice.choose_gpu_backend(candidates, torch.bfloat16, 65536, torch.device("cuda", 1)) == "triton"
    assert gpu_choice.choose_gpu_backend(candidates, torch.bfloat16, 65536, torch.device("cuda", 0)) == "cuda"
    assert gpu_choice.choose_gpu_backend(candidates, torch.bfloat16, 65536, torch.device("cuda")) == "cuda"
    assert registry._CHOOSERS["cuda"](candidates, torch.bfloat16, 65536, torch.device("cuda", 1)) == "triton"
