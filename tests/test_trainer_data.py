"""Data sets: embedded digits, generated glyphs, CIFAR-100 from files in the real format, ImageFolder, augmentation."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from smskd_fast.training.data import augment, augmentation_draws, iterate_batches, load_splits, split_validation
from smskd_fast.training.glyphs import generate_glyphs
from smskd_fast.training.config import parse_config
from smskd_fast.training.trainer import SMSKDTrainer


def test_digits_split_is_fixed_and_disjoint():
    splits = load_splits("digits")
    assert (len(splits.train), len(splits.test)) == (1438, 359)
    assert splits.train.num_classes == 10 and splits.train.image_shape == (1, 8, 8)
    assert torch.equal(torch.bincount(splits.test.labels), torch.bincount(load_splits("digits").test.labels))
    assert set(torch.bincount(splits.test.labels).tolist()) <= {35, 36, 37}  # stratified 20 %
    images, _ = splits.train.batch(torch.arange(len(splits.train)))
    assert images.min() == 0.0 and images.max() == 1.0
    train_rows = {tuple(row) for row in splits.train.images.flatten(1).tolist()}
    test_rows = [tuple(row) for row in splits.test.images.flatten(1).tolist()]
    assert sum(row in train_rows for row in test_rows) < 5  # (a few digits are pixel-identical in the source)


def _write_cifar(root, train_count=6, test_count=4):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, count in (("train", train_count), ("test", test_count)):
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=count).tolist()
        entry = {"filenames": [f"{split}_{i}.png" for i in range(count)], "batch_label": f"{split} batch",
                 "fine_labels": fine, "coarse_labels": [label // 5 for label in fine], "data": data}
        with open(folder / split, "wb") as handle:
            pickle.dump(entry, handle)
        written[split] = (data, fine)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]}, handle)
    return written


def test_cifar100_reads_torchvision_files(tmp_path):
    written = _write_cifar(tmp_path)
    splits = load_splits("cifar100", str(tmp_path))
    assert (len(splits.train), len(splits.test), splits.train.num_classes) == (6, 4, 100)
    data, fine = written["train"]
    images, labels = splits.train.batch(torch.tensor([2, 5]))
    assert labels.tolist() == [fine[2], fine[5]]
    expected = torch.from_numpy(data[[2, 5]].reshape(2, 3, 32, 32)).float() / 255
    assert torch.equal(images, expected)  # channel-major rows, as in the real files


def test_cifar100_missing_files_explain_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_splits("cifar100", str(tmp_path))
    with pytest.raises(ValueError, match="data.root"):
        load_splits("cifar100", None)


def test_trainer_runs_on_cifar100_files(tmp_path):
    _write_cifar(tmp_path / "data", train_count=8, test_count=4)
    config = parse_config({"student": {"name": "resnet20"}, "plots": False, "progress": False,
                           "data": {"name": "cifar100", "root": str(tmp_path / "data"), "batch_size": 4,
                                    "augment": "crop_flip"},
                           "stages": [{"method": "none", "epochs": 1}]})
    summary = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None).run()
    assert summary["epochs"] == 1


def test_image_folder(tmp_path):
    pytest.importorskip("torchvision")  # an optional package (tests/test_cli_errors.py: the error without it)
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    splits = load_splits("imagefolder", str(tmp_path), image_size=8)
    assert (len(splits.train), len(splits.test), splits.train.num_classes) == (4, 4, 2)
    images, labels = splits.test.batch(torch.tensor([0, 3]))
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1]


def test_batches_cover_the_data_once_in_generator_order():
    train = load_splits("digits").train.subset(50)
    seen = torch.cat([idx for _, _, idx in iterate_batches(train, 16, shuffle=True,
                                                           generator=torch.Generator().manual_seed(3))])
    assert sorted(seen.tolist()) == list(range(50))
    again = torch.cat([idx for _, _, idx in iterate_batches(train, 16, shuffle=True,
                                                            generator=torch.Generator().manual_seed(3))])
    assert torch.equal(seen, again)


def test_crop_flip_takes_windows_of_the_padded_image():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    draws = augmentation_draws(0, 0, torch.arange(2))
    out = augment(images, "crop_flip", draws, padding=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for n in range(2):
        y, x = int(draws[n, 0] * 5), int(draws[n, 1] * 5)  # the window the draws pick, flipped iff draw < 1/2
        window = padded[n, :, y:y + 5, x:x + 5]
        assert torch.equal(out[n], window.flip(-1) if draws[n, 2] < 0.5 else window)
    assert torch.equal(augment(images, "none", draws), images)
    with pytest.raises(ValueError, match="data.augment"):
        augment(images, "rotate", draws)
    with pytest.raises(ValueError, match="draws must have shape"):
        augment(images, "crop", draws[:1])


def test_augmentation_draws_depend_only_on_seed_epoch_and_sample():
    everything = augmentation_draws(7, 3, torch.arange(1000))
    some = torch.tensor([999, 5, 500, 5])
    assert torch.equal(augmentation_draws(7, 3, some), everything[some])  # any order, any batch, repeats
    assert not torch.equal(augmentation_draws(8, 3, torch.arange(1000)), everything)  # another seed
    assert not torch.equal(augmentation_draws(7, 4, torch.arange(1000)), everything)  # another epoch
    assert everything.min() >= 0 and everything.max() < 1
    # Roughly uniform and independent streams: 3000 draws, mean 1/2 +- 4 sigma, tiny correlation.
    assert abs(float(everything.mean()) - 0.5) < 4 * (1 / 12 / 3000) ** 0.5
    assert abs(float(torch.corrcoef(everything.T)[0, 1])) < 0.15


def test_every_crop_window_and_both_flips_occur():
    draws = augmentation_draws(0, 0, torch.arange(2000))
    offsets = (draws[:, :2] * 9).long()  # padding 4: 9 offsets per axis
    assert set(offsets[:, 0].tolist()) == set(range(9)) and set(offsets[:, 1].tolist()) == set(range(9))
    assert 0.45 < float((draws[:, 2] < 0.5).double().mean()) < 0.55


def test_glyphs_have_the_stated_sizes_balanced_classes_and_no_run_seed():
    splits = load_splits("glyphs")
    assert (len(splits.train), len(splits.test), splits.train.num_classes) == (16000, 5000, 32)
    assert splits.train.image_shape == (1, 8, 8) and splits.test.num_classes == 32
    assert torch.bincount(splits.train.labels, minlength=32).tolist() == [500] * 32
    assert set(torch.bincount(splits.test.labels, minlength=32).tolist()) == {156, 157}  # 5000 = 32 * 156 + 8
    images, _ = splits.train.batch(torch.arange(len(splits.train)))
    assert images.min() == 0.0 and images.max() == 1.0
    again = load_splits("glyphs")  # a fixed data seed: every run (and run seed) sees the same images
    assert torch.equal(again.train.images, splits.train.images) and torch.equal(again.test.labels, splits.test.labels)
    train, validation = split_validation(splits.train, 0.2)
    assert (len(train), len(validation)) == (12800, 3200)


def test_glyphs_generation_is_a_pure_function_of_the_seed():
    generate = generate_glyphs.__wrapped__  # past the per-process cache: a second, independent generation
    first, second, other = generate(7, 96, 40, 5, 8), generate(7, 96, 40, 5, 8), generate(8, 96, 40, 5, 8)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second))
    assert first[0].tobytes() != other[0].tobytes() and first[2].tobytes() != other[2].tobytes()
    assert first[0].dtype == np.uint8 and first[0].shape == (96, 8, 8) and first[3].shape == (40,)
    # The labels use only exact arithmetic (integer hashing, power-of-two scaling, a stable sort), so
    # they are pinned bit for bit: a change here changes the task behind docs/results.md.
    labels = generate_glyphs()[1]
    assert hashlib.sha256(labels.tobytes()).hexdigest()[:16] == "5ebc8cc733274e27"
    with pytest.raises(ValueError, match="classes must be >= 1"):
        generate(7, 96, 40, 0, 8)


def test_glyph_labels_are_learnable_but_not_trivial():
    """Nearest class mean (train means, test images): far above chance (1/32), far below 100%,
    so the labels follow the images and a better model has room to be better."""
    train_images, train_labels, test_images, test_labels = generate_glyphs()
    flat_train = train_images.reshape(len(train_images), -1) / 255.0
    flat_test = test_images.reshape(len(test_images), -1) / 255.0
    means = np.stack([flat_train[train_labels == label].mean(0) for label in range(32)])
    distances = ((flat_test[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = float((distances.argmin(1) == test_labels).mean())
    assert 0.4 < accuracy < 0.8, accuracy
    shuffled = np.roll(test_labels, 1)  # the same images against labels of other images: chance level
    assert float((distances.argmin(1) == shuffled).mean()) < 0.06


def test_the_demo_default_is_the_shipped_glyphs_config():
    from smskd_fast.cli import DEMO_CONFIG
    from smskd_fast.training.config import load_config

    assert DEMO_CONFIG.is_file() and DEMO_CONFIG.parent.name == "configs"  # inside the package: in the wheel
    assert load_config(DEMO_CONFIG).data.name == "glyphs"
    repository_copy = Path(__file__).resolve().parent.parent / "configs" / "glyphs_demo.yaml"
    assert repository_copy.resolve() == DEMO_CONFIG.resolve()
