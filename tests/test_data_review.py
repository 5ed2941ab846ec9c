"""Data pipeline review: text files too short for a window, a validation fraction that holds out
nothing, CIFAR files without images or with impossible labels, ImageFolder subsets (the first N
samples) that covered only the first class, unreadable images, and one scan of train/."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from smskd_fast.training.data import (TEXT_TEST_FRACTION, augment, augmentation_draws, load_splits,
                                      split_validation)


def _text_file(tmp_path, size: int):
    path = tmp_path / f"text_{size}.txt"
    path.write_bytes(bytes((97 + i % 26) for i in range(size)))
    return path


def test_a_text_file_too_short_for_a_window_names_the_file_the_split_and_the_size_needed(tmp_path):
    context = 64
    # Independent oracle: the smallest file whose first 90 % and last 10 % both hold context + 1 bytes.
    minimum = next(n for n in range(1, 10_000)
                   if int(n * (1 - TEXT_TEST_FRACTION)) >= context + 1
                   and n - int(n * (1 - TEXT_TEST_FRACTION)) >= context + 1)
    for size, split in ((0, "training"), (1, "training"), (200, "test"), (minimum - 1, "test")):
        path = _text_file(tmp_path, size)
        with pytest.raises(ValueError) as caught:
            load_splits("text", str(path), context_length=context)
        message = str(caught.value)
        assert str(path) in message and f"has {size} bytes" in message, message
        assert f"its {split} split" in message and "data.context_length + 1 = 65" in message, message
        assert f"at least {minimum} bytes" in message, message
    splits = load_splits("text", str(_text_file(tmp_path, minimum)), context_length=context)
    assert len(splits.train) >= 1 and len(splits.test) == 1  # the size named is enough


def test_a_validation_fraction_that_holds_out_nothing_is_refused_not_silently_dropped():
    train = load_splits("digits").train.subset(10)
    with pytest.raises(ValueError, match=r"data\.validation_fraction 0\.04 of 10 training items holds out none; "
                                         r"use at least 0\.1"):
        split_validation(train, 0.04)
    kept, held = split_validation(train, 0.1)  # the fraction the message names holds out one item
    assert (len(kept), len(held)) == (9, 1)
    assert split_validation(train, 0.0) == (train, None)  # 0: no validation split, as before


def _write_cifar_split(folder, split, data, labels):
    with open(folder / split, "wb") as handle:
        pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, handle)


def test_cifar_files_without_images_or_with_labels_outside_the_100_classes_are_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    good = np.zeros((2, 3072), dtype=np.uint8)
    _write_cifar_split(folder, "test", good, [0, 99])
    _write_cifar_split(folder, "train", np.zeros((0, 3072), dtype=np.uint8), [])
    with pytest.raises(ValueError, match=r"cifar-100-python/train holds no images"):
        load_splits("cifar100", str(tmp_path))
    for labels in ([3, 100], [-1, 3]):
        _write_cifar_split(folder, "train", good, labels)
        with pytest.raises(ValueError, match=r"cifar-100-python/train has 'fine_labels' from -?\d+ to \d+, outside"):
            load_splits("cifar100", str(tmp_path))
    _write_cifar_split(folder, "train", good, [0, 99])
    assert load_splits("cifar100", str(tmp_path)).train.labels.tolist() == [0, 99]


def _solid_image_folder(root, counts):
    """Solid grey images whose level encodes (class, file): 10 * class + file + 1."""
    from PIL import Image

    for split in ("train", "test"):
        for label, count in enumerate(counts):
            (root / split / f"class{label}").mkdir(parents=True)
            for i in range(count):
                level = 10 * label + i + 1
                Image.fromarray(np.full((6, 9, 3), level, dtype=np.uint8)).save(
                    root / split / f"class{label}" / f"{i}.png")


def test_image_folder_subsets_cover_every_class_and_keep_each_image_with_its_label(tmp_path):
    pytest.importorskip("torchvision")
    counts = (4, 4, 2)
    _solid_image_folder(tmp_path, counts)
    splits = load_splits("imagefolder", str(tmp_path), image_size=4)
    for split in (splits.train, splits.test):
        assert torch.bincount(split.labels, minlength=3).tolist() == list(counts)  # every file once
        images, labels = split.batch(torch.arange(len(split)))
        levels = torch.round(images[:, 0, 0, 0] * 255).long()
        assert torch.equal(levels // 10, labels) and labels.dtype == torch.int64  # each image with its own class
        assert sorted(levels.tolist()) == sorted(10 * c + i + 1 for c, n in enumerate(counts) for i in range(n))
        first_six = split.subset(6)  # data.train_subset / test_subset: the first N samples
        assert torch.bincount(first_six.labels, minlength=3).tolist() == [2, 2, 2]
        images, labels = first_six.batch(torch.arange(6))
        assert torch.equal(torch.round(images[:, 0, 0, 0] * 255).long() // 10, labels)
    train, validation = split_validation(splits.train, 0.3)  # still consistent through the hold-out's _take
    images, labels = validation.batch(torch.arange(len(validation)))
    assert len(validation) == 3 and torch.equal(torch.round(images[:, 0, 0, 0] * 255).long() // 10, labels)


def test_an_unreadable_image_is_reported_with_its_path(tmp_path):
    pytest.importorskip("torchvision")
    _solid_image_folder(tmp_path, (2, 2))
    good = (tmp_path / "train" / "class0" / "0.png").read_bytes()
    truncated = tmp_path / "train" / "class1" / "truncated.png"
    truncated.write_bytes(good[:len(good) // 2])
    garbage = tmp_path / "train" / "class0" / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    train = load_splits("imagefolder", str(tmp_path), image_size=4).train
    failures = []
    for index in range(len(train)):
        try:
            train.batch(torch.tensor([index]))
        except ValueError as error:
            failures.append(str(error))
    assert len(failures) == 2, failures
    for path in (garbage, truncated):
        assert sum(f"ImageFolder image {path} could not be read" in message for message in failures) == 1, failures


def test_image_folder_scans_the_train_folder_once(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    from torchvision import datasets

    _solid_image_folder(tmp_path, (1, 1))
    scanned = []

    class CountingImageFolder(datasets.ImageFolder):
        def __init__(self, root, *args, **kwargs):
            scanned.append(root.rsplit("/", 1)[-1])
            super().__init__(root, *args, **kwargs)

    monkeypatch.setattr(datasets, "ImageFolder", CountingImageFolder)
    splits = load_splits("imagefolder", str(tmp_path), image_size=4)
    assert (len(splits.train), len(splits.test)) == (2, 2)
    assert sorted(scanned) == ["test", "train"]  # (a second scan of train/ costs minutes on ImageNet)


def test_augment_works_where_the_images_are():
    """augment is public and its draws are CPU tensors (augmentation_draws): on images elsewhere (a GPU; here
    the meta device stands for one) the flip's condition was a CPU tensor beside them and torch.where refused."""
    images = torch.rand(3, 3, 8, 8)
    draws = augmentation_draws(0, 0, torch.arange(3))
    for kind in ("crop", "crop_flip"):
        moved = augment(images.to("meta"), kind, draws)
        assert moved.device.type == "meta" and moved.shape == images.shape
