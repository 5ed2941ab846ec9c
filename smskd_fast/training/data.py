"""Data sets for the trainer: embedded digits, generated glyphs (glyphs.py), CIFAR-100 from
disk, ImageFolder, and byte-level text for causal language models (a sequence task).

Every split is an ImageSet that turns a list of indices into a batch. Random
augmentation is replayable: each sample's crop and flip come from uniforms that are
a pure function of (seed, epoch, sample index) (see augmentation_draws), not of the
stage, the batch or the order. A resumed run, a later stage with the same epoch
index, and the logit cache's builder therefore all see the same view of a sample.

A subset (data.train_subset / data.test_subset) is the first N items of a split. Digits,
glyphs and CIFAR-100 store their items in no class order; ImageFolder's files, which
torchvision lists class by class, are taken class by class in turn (_class_interleaved), so
the first N items of every data set cover its classes.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from smskd_fast.training.optional_packages import require_torchvision

__all__ = ["ImageSet", "TokenSet", "DataSplits", "load_splits", "split_validation", "iterate_batches", "augment",
           "augmentation_draws", "AUGMENT_STREAMS", "DATASETS", "SEQUENCE_DATASETS"]

DIGITS_FILE = Path(__file__).resolve().parents[1] / "data" / "digits.npz"
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_FILE = Path(__file__).resolve().parents[1] / "data" / "tiny_stories.txt"
BYTE_VOCABULARY = 256
TEXT_TEST_FRACTION = 0.1
SEQUENCE_DATASETS = ("text",)
DATASETS = ("digits", "glyphs", "cifar100", "imagefolder") + SEQUENCE_DATASETS
AUGMENT_STREAMS = 3  # uniforms per sample: crop row, crop column, flip
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class ImageSet:
    """A split of labelled images; batch(indices) gives float images in [0, 1] and labels.

    Images live in memory as uint8 (N, C, H, W) divided by `scale`, or, for
    ImageFolder, are loaded on demand by `load_item`.
    """

    task: ClassVar[str] = "classification"

    labels: torch.Tensor
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    images: Optional[torch.Tensor] = None
    scale: float = 255.0
    load_item: Optional[Callable[[int], torch.Tensor]] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.images is not None:
            images = self.images[indices].float() / self.scale
        else:
            images = torch.stack([self.load_item(int(i)) for i in indices])
        return images, self.labels[indices]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    def subset(self, count: Optional[int]) -> "ImageSet":
        """The first `count` items (all when None): small runs for tests and smoke checks."""
        if count is None or count >= len(self):
            return self
        keep = torch.arange(count)
        return ImageSet(
            labels=self.labels[keep], num_classes=self.num_classes, mean=self.mean, std=self.std,
            images=None if self.images is None else self.images[keep], scale=self.scale,
            load_item=self.load_item,
        )

    @property
    def image_shape(self) -> Tuple[int, ...]:
        images, _ = self.batch(torch.arange(1))
        return tuple(images.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.image_shape[0]


@dataclass
class TokenSet:
    """Windows of a byte stream for next-token prediction (the "sequence" task).

    windows is (N, L + 1) uint8; batch(indices) gives the tokens (B, L) and their
    targets, the same windows shifted by one (B, L), both int64. Its interface is
    ImageSet's, so the trainer iterates, subsets and normalises both alike.
    """

    task: ClassVar[str] = "sequence"
    in_channels: ClassVar[int] = 1  # one stream of token ids

    windows: torch.Tensor
    num_classes: int = BYTE_VOCABULARY

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def batch(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        window = self.windows[indices].long()
        return window[:, :-1], window[:, 1:]

    def normalize(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def subset(self, count: Optional[int]) -> "TokenSet":
        """The first `count` windows (all when None)."""
        if count is None or count >= len(self):
            return self
        return TokenSet(self.windows[:count], self.num_classes)

    @staticmethod
    def from_bytes(data: bytes, context_length: int) -> "TokenSet":
        """Non-overlapping windows of context_length + 1 bytes, stride context_length (the last
        byte of one window is the first of the next, so every byte is a target once)."""
        count = (len(data) - 1) // context_length
        if count < 1:  # (checked before torch.frombuffer, which refuses an empty buffer with its own message)
            raise ValueError(f"the text has {len(data)} bytes, too few for one window of "
                             f"data.context_length + 1 = {context_length + 1}")
        stream = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        starts = torch.arange(count) * context_length
        return TokenSet(stream[starts[:, None] + torch.arange(context_length + 1)])


@dataclass
class DataSplits:
    train: Union[ImageSet, TokenSet]
    test: Union[ImageSet, TokenSet]
    validation: Optional[Union[ImageSet, TokenSet]] = None  # carved from the training data


def _take(dataset: Union[ImageSet, TokenSet], keep: torch.Tensor) -> Union[ImageSet, TokenSet]:
    """The items `keep` of a split, in that order."""
    if isinstance(dataset, TokenSet):
        return TokenSet(dataset.windows[keep], dataset.num_classes)
    load_item = dataset.load_item
    return ImageSet(labels=dataset.labels[keep], num_classes=dataset.num_classes, mean=dataset.mean,
                    std=dataset.std, images=None if dataset.images is None else dataset.images[keep],
                    scale=dataset.scale,
                    load_item=None if load_item is None else (lambda index: load_item(int(keep[index]))))


def split_validation(train: Union[ImageSet, TokenSet], fraction: float) -> Tuple[Union[ImageSet, TokenSet],
                                                                             Optional[Union[ImageSet, TokenSet]]]:
    """(train, validation): `fraction` of the training items held out, the same for every run seed
    (none for fraction 0; a fraction > 0 that rounds to no item is refused).

    Text keeps its last windows (a contiguous tail, so no window of the validation text is
    also trained on); images a fixed pseudo-random draw (seeded by a constant, not the run
    seed, so that every seed of a study is chosen on the same validation items).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.validation_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return train, None
    held = int(round(len(train) * fraction))
    if held == 0:  # asked for a validation split, but it would be empty: say so rather than silently omit it
        raise ValueError(f"data.validation_fraction {fraction} of {len(train)} training items holds out none; "
                         f"use at least {1 / len(train):.3g} (one item) or 0 for no validation split")
    if held >= len(train):
        raise ValueError(f"data.validation_fraction {fraction} leaves no training data of {len(train)} items")
    if isinstance(train, TokenSet):
        order = torch.arange(len(train))
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(20260115))
    keep, held_out = order[:len(train) - held].sort().values, order[len(train) - held:].sort().values
    return _take(train, keep), _take(train, held_out)


def _smallest_text_file(window: int) -> int:
    """The fewest bytes whose training and test splits (_text's) both hold a window of `window` bytes."""
    size = window
    while min(int(size * (1 - TEXT_TEST_FRACTION)), size - int(size * (1 - TEXT_TEST_FRACTION))) < window:
        size += 1
    return size


def _text(root: Optional[str], context_length: int) -> DataSplits:
    """A UTF-8 text file as bytes (root, or the shipped generated stories); the last
    TEXT_TEST_FRACTION of it is the test split."""
    path = Path(root) if root is not None else TEXT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found; data.root must name a text file for data set 'text'")
    data = path.read_bytes()
    split = int(len(data) * (1 - TEXT_TEST_FRACTION))
    need = context_length + 1  # bytes in one window
    parts = {"training": data[:split], "test": data[split:]}
    short = [name for name, part in parts.items() if len(part) < need]
    if short:
        raise ValueError(
            f"text file {path} has {len(data)} bytes: its {short[0]} split ({len(parts[short[0]])} bytes; the test "
            f"split is the last {TEXT_TEST_FRACTION:.0%} of the file) is too short for one window of "
            f"data.context_length + 1 = {need} bytes; give a text file of at least {_smallest_text_file(need)} "
            "bytes in data.root or a smaller data.context_length")
    return DataSplits(train=TokenSet.from_bytes(data[:split], context_length),
                      test=TokenSet.from_bytes(data[split:], context_length))


def _digits() -> DataSplits:
    with np.load(DIGITS_FILE) as archive:
        arrays = {key: torch.from_numpy(archive[key]) for key in archive.files}
    train_images = arrays["train_images"].unsqueeze(1)  # (N, 1, 8, 8), 0..16
    scaled = train_images.float() / 16.0
    stats = dict(mean=(float(scaled.mean()),), std=(float(scaled.std()),), scale=16.0, num_classes=10)
    return DataSplits(
        train=ImageSet(labels=arrays["train_labels"], images=train_images, **stats),
        test=ImageSet(labels=arrays["test_labels"], images=arrays["test_images"].unsqueeze(1), **stats),
    )


def _glyphs() -> DataSplits:
    """The generated glyphs task (glyphs.generate_glyphs with its fixed seed): the same images
    for every run seed, so the run seed varies only the training."""
    from smskd_fast.training.glyphs import GLYPH_CLASSES, generate_glyphs  # glyphs imports this module

    train_images, train_labels, test_images, test_labels = (torch.from_numpy(array.copy())
                                                            for array in generate_glyphs())
    scaled = train_images.float() / 255.0
    stats = dict(mean=(float(scaled.mean()),), std=(float(scaled.std()),), scale=255.0, num_classes=GLYPH_CLASSES)
    return DataSplits(train=ImageSet(labels=train_labels, images=train_images.unsqueeze(1), **stats),
                      test=ImageSet(labels=test_labels, images=test_images.unsqueeze(1), **stats))


def _read_cifar_file(path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-100 file {path} not found; data.root must hold torchvision's layout "
            "(<root>/cifar-100-python/{train,test}), e.g. from "
            "torchvision.datasets.CIFAR100(root, download=True)"
        )
    expected = ("a pickled dict with 'data' (N x 3072 uint8) and 'fine_labels', as in "
                "torchvision.datasets.CIFAR100(root, download=True)")
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(entry["fine_labels"], dtype=torch.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise ValueError(f"CIFAR-100 file {path} is not in the expected format ({type(error).__name__}: "
                         f"{error}); it must be {expected}") from None
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"CIFAR-100 file {path} has {data.shape[0]} images but {labels.shape[0]} labels; "
                         f"it must be {expected}")
    if data.shape[0] == 0:
        raise ValueError(f"CIFAR-100 file {path} holds no images; it must be {expected}")
    if labels.min() < 0 or labels.max() >= 100:
        raise ValueError(f"CIFAR-100 file {path} has 'fine_labels' from {int(labels.min())} to {int(labels.max())}, "
                         f"outside the 100 classes 0..99; it must be {expected}")
    return torch.from_numpy(data.copy()), labels


def _cifar100(root: Path) -> DataSplits:
    base = root / "cifar-100-python"
    stats = dict(mean=CIFAR100_MEAN, std=CIFAR100_STD, scale=255.0, num_classes=100)
    train_images, train_labels = _read_cifar_file(base / "train")
    test_images, test_labels = _read_cifar_file(base / "test")
    return DataSplits(
        train=ImageSet(labels=train_labels, images=train_images, **stats),
        test=ImageSet(labels=test_labels, images=test_images, **stats),
    )


def _class_interleaved(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """An order of ImageFolder's samples (which it sorts by class) that takes the classes in turn:
    the first sample of every class, then the second, and so on, each class in its own file order.
    So the first N samples (data.train_subset / data.test_subset) cover the classes evenly, not
    only the first class."""
    by_class = torch.sort(targets, stable=True).indices
    sorted_targets = targets[by_class]
    counts = torch.bincount(sorted_targets, minlength=num_classes)
    first_of_class = torch.cumsum(counts, 0) - counts
    rank = torch.arange(targets.numel()) - first_of_class[sorted_targets]  # place within its class
    return by_class[torch.sort(rank * num_classes + sorted_targets, stable=True).indices]


def _image_folder_split(folder: Path, image_size: int,
                        classes: Optional[Sequence[str]]) -> Tuple[ImageSet, Sequence[str]]:
    """One ImageFolder split and its class names (torchvision's sorted class folders)."""
    from PIL import Image
    from torchvision import datasets, transforms  # _image_folder checked that it imports

    if not folder.is_dir():
        raise FileNotFoundError(f"ImageFolder split {folder} not found; data.root must hold train/ and test/ (or val/)")
    transform = transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
    ])
    try:
        folder_set = datasets.ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as error:  # no class folders, or class folders without images
        raise FileNotFoundError(f"ImageFolder split {folder}: {error}; it must hold one folder of images per "
                                "class (e.g. train/cat/1.png)") from None
    if classes is not None and list(folder_set.classes) != list(classes):
        raise ValueError(f"{folder} has classes {folder_set.classes}, but the train split has {list(classes)}")
    num_classes = len(folder_set.classes)
    order = _class_interleaved(torch.as_tensor(folder_set.targets, dtype=torch.int64), num_classes)
    labels = torch.as_tensor(folder_set.targets, dtype=torch.int64)[order]

    def load_item(index: int) -> torch.Tensor:
        position = int(order[index])
        try:
            return folder_set[position][0]
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:  # PIL's errors
            raise ValueError(f"ImageFolder image {folder_set.samples[position][0]} could not be read "
                             f"({type(error).__name__}: {error}); replace or remove the file") from error

    return ImageSet(labels=labels, num_classes=num_classes, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    load_item=load_item), folder_set.classes


def _image_folder(root: Path, image_size: int) -> DataSplits:
    require_torchvision("data.name 'imagefolder'")
    train, classes = _image_folder_split(root / "train", image_size, None)  # (one scan of train/)
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    test, _ = _image_folder_split(test_dir, image_size, classes)
    return DataSplits(train=train, test=test)


def load_splits(name: str, root: Optional[str] = None, image_size: int = 224,
                context_length: int = 64) -> DataSplits:
    """The train and test splits of data set `name` (one of DATASETS)."""
    if name == "digits":
        return _digits()
    if name == "glyphs":
        return _glyphs()
    if name == "text":
        return _text(root, context_length)
    if name not in DATASETS:
        raise ValueError(f"data.name must be one of {list(DATASETS)}, got {name!r}")
    if root is None:
        raise ValueError(f"data.root (or --data-dir) is required for data set {name!r}")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data.root {root} is not a directory; give the folder that holds data set {name!r} "
                                "(with --data-dir DIR or --set data.root=DIR)")
    if name == "cifar100":
        return _cifar100(Path(root))
    return _image_folder(Path(root), image_size)


def iterate_batches(dataset: Union[ImageSet, TokenSet], batch_size: int, *, shuffle: bool,
                    generator: Optional[torch.Generator] = None,
                    drop_last: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yields (inputs, targets, indices) batches, e.g. images in [0, 1] and labels; the order
    comes from `generator`."""
    count = len(dataset)
    order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    stop = count - count % batch_size if drop_last and count >= batch_size else count
    for start in range(0, stop, batch_size):
        indices = order[start:start + batch_size]
        images, labels = dataset.batch(indices)
        yield images, labels, indices


def _splitmix64(counter: np.ndarray) -> np.ndarray:
    """The splitmix64 output function: a well-mixed 64-bit value per (uint64) counter."""
    z = counter * _GOLDEN  # wraps modulo 2**64, like every uint64 array operation below
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def augmentation_draws(seed: int, epoch: int, indices: torch.Tensor, streams: int = AUGMENT_STREAMS) -> torch.Tensor:
    """Uniforms in [0, 1) of shape (len(indices), streams), a pure function of (seed, epoch, sample index).

    A counter-based generator: sample i's stream s is splitmix64 of a key hashed from
    (seed, epoch) plus the counter i * streams + s, so any subset of samples, in any
    order or batch, gets the same numbers.
    """
    key = int.from_bytes(hashlib.sha256(repr(("augment", int(seed), int(epoch))).encode()).digest()[:8], "little")
    counters = indices.cpu().numpy().astype(np.uint64)[:, None] * np.uint64(streams) + np.arange(streams, dtype=np.uint64)
    bits = _splitmix64(counters + np.uint64(key))
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


def augment(images: torch.Tensor, kind: str, draws: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Per-sample augmentation from draws (N, AUGMENT_STREAMS) of augmentation_draws: "none",
    "crop" (zero-pad and random crop) or "crop_flip" (also a horizontal flip with probability
    1/2), as in the CIFAR KD recipes."""
    if kind == "none":
        return images
    if kind not in ("crop", "crop_flip"):
        raise ValueError(f"data.augment must be 'none', 'crop' or 'crop_flip', got {kind!r}")
    count, channels, height, width = images.shape
    if draws.shape != (count, AUGMENT_STREAMS):
        raise ValueError(f"augment: draws must have shape {(count, AUGMENT_STREAMS)}, got {tuple(draws.shape)}")
    device = images.device  # the draws come from the CPU (augmentation_draws); the images may be anywhere
    draws = draws.to(device)
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    offset_y = (draws[:, 0] * (2 * padding + 1)).long()
    offset_x = (draws[:, 1] * (2 * padding + 1)).long()
    rows = (offset_y[:, None] + torch.arange(height, device=device)).view(count, 1, height, 1)
    cols = (offset_x[:, None] + torch.arange(width, device=device)).view(count, 1, 1, width)
    batch_index = torch.arange(count, device=device).view(count, 1, 1, 1)
    channel_index = torch.arange(channels, device=device).view(1, channels, 1, 1)
    cropped = padded[batch_index, channel_index, rows, cols]
    if kind == "crop_flip":
        flip = draws[:, 2] < 0.5
        cropped = torch.where(flip.view(count, 1, 1, 1), cropped.flip(-1), cropped)
    return cropped
