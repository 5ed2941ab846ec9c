"""Data sets: the embedded digits split, CIFAR-100 from files in the real format, ImageFolder, augmentation."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from smskd_fast.data import augment, iterate_batches, load_splits
from smskd_fast.config import parse_config
from smskd_fast.stages import SMSKDTrainer


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
    out = augment(images, "crop_flip", torch.Generator().manual_seed(0), padding=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, y:y + 5, x:x + 5] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[n], w) or torch.equal(out[n], w.flip(-1)) for w in windows)
    assert torch.equal(augment(images, "none", torch.Generator()), images)
    with pytest.raises(ValueError, match="data.augment"):
        augment(images, "rotate", torch.Generator())
