"""Glyphs: a procedurally generated image task where distillation has room to help.

Each of GLYPH_CLASSES classes is a prototype of GLYPH_STROKES random line segments. A
sample is its class's prototype with jittered end points, a random rotation, scale and
shift, a random stroke width and contrast, one dimmer clutter stroke of no class, and
Gaussian pixel noise, rendered as a GLYPH_SIZE x GLYPH_SIZE grey image (uint8).

Why this task: the embedded digits have a 359-image test split (one image is 0.28 points,
as large as the effects) and the tiny LM's teacher is barely above its student. Here, with
16,000 training images of 32 overlapping, noisy classes, a wide CNN is 16 points above a
narrow one, and in 5,000 test images one point is 50 images.

The random numbers are the same on every platform and NumPy version: each is a splitmix64
counter hashed from (seed, split, stream), the scheme of data.augmentation_draws, not a
NumPy generator whose streams may change between releases. (The rendering's exp, cos and
hypot may still differ in the last bit between math libraries, which can move a rare pixel
by one grey level; the labels use exact arithmetic only.)
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Tuple

import numpy as np

from smskd_fast.training.data import _splitmix64

__all__ = ["GLYPH_CLASSES", "GLYPH_SIZE", "GLYPH_TRAIN", "GLYPH_TEST", "GLYPH_SEED", "generate_glyphs"]

GLYPH_CLASSES = 32
GLYPH_SIZE = 8
GLYPH_TRAIN = 16000
GLYPH_TEST = 5000
GLYPH_SEED = 20261205
GLYPH_STROKES = 3
GLYPH_NOISE = 0.2          # std of the additive pixel noise, on a [0, 1] intensity scale
GLYPH_JITTER = 0.10        # std of each end point's offset from the prototype, in glyph units ([-1, 1] wide)
CLUTTER_INTENSITY = 0.7    # the clutter stroke's peak, relative to the glyph's


def _uniforms(seed: int, stream: str, shape: Tuple[int, ...]) -> np.ndarray:
    """Uniforms in [0, 1) of `shape`, a pure function of (seed, stream)."""
    key = int.from_bytes(hashlib.sha256(repr(("glyphs", int(seed), stream)).encode()).digest()[:8], "little")
    bits = _splitmix64(np.arange(int(np.prod(shape)), dtype=np.uint64) + np.uint64(key))
    return ((bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53).reshape(shape)


def _normals(seed: int, stream: str, shape: Tuple[int, ...]) -> np.ndarray:
    """Standard normals of `shape` (Box-Muller over two uniform streams)."""
    pair = _uniforms(seed, stream, (2, *shape))
    return np.sqrt(-2.0 * np.log1p(-pair[0])) * np.cos(2.0 * np.pi * pair[1])


def _segment_distance(x: np.ndarray, y: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance from the points (x, y), shape (P,), to segments start-end, shape (..., 2): (..., P)."""
    ax, ay = start[..., 0:1], start[..., 1:2]
    dx, dy = end[..., 0:1] - ax, end[..., 1:2] - ay
    along = ((x - ax) * dx + (y - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-12)
    along = np.clip(along, 0.0, 1.0)
    return np.hypot(x - ax - along * dx, y - ay - along * dy)


def _render(seed: int, split: str, count: int, classes: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    prototypes = _uniforms(seed, "prototypes", (classes, GLYPH_STROKES, 2, 2)) * 1.6 - 0.8
    order = np.argsort(_uniforms(seed, f"{split}/order", (count,)), kind="stable")
    labels = (np.arange(count) % classes)[order]  # balanced: count // classes or one more per class
    pose = _uniforms(seed, f"{split}/pose", (count, 6))
    angle, scale = (pose[:, 0] - 0.5) * 0.6, 0.8 + 0.3 * pose[:, 1]
    shift, width, contrast = (pose[:, 2:4] - 0.5) * 0.3, 0.10 + 0.08 * pose[:, 4], 0.6 + 0.4 * pose[:, 5]
    points = prototypes[labels] + GLYPH_JITTER * _normals(seed, f"{split}/jitter", (count, GLYPH_STROKES, 2, 2))
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (N, 2, 2)
    points = np.einsum("nij,nskj->nski", rotation, points) + shift[:, None, None, :]
    clutter = _uniforms(seed, f"{split}/clutter", (count, 1, 2, 2)) * 2.0 - 1.0
    segments = np.concatenate([points, clutter], axis=1)  # (N, strokes + 1, 2 end points, 2)
    centres = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = (axis.ravel() for axis in np.meshgrid(centres, centres, indexing="ij"))
    distance = _segment_distance(x, y, segments[:, :, 0], segments[:, :, 1])  # (N, strokes + 1, size * size)
    ink = np.exp(-(distance / width[:, None, None]) ** 2)
    ink[:, GLYPH_STROKES:] *= CLUTTER_INTENSITY
    image = ink.max(axis=1) * contrast[:, None] + GLYPH_NOISE * _normals(seed, f"{split}/noise", (count, size * size))
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image.reshape(count, size, size), labels.astype(np.int64)


@lru_cache(maxsize=2)
def generate_glyphs(seed: int = GLYPH_SEED, train: int = GLYPH_TRAIN, test: int = GLYPH_TEST,
                    classes: int = GLYPH_CLASSES, size: int = GLYPH_SIZE) -> Tuple[np.ndarray, ...]:
    """(train_images, train_labels, test_images, test_labels): images (N, size, size) uint8,
    labels int64 in [0, classes). The same arguments give the same bytes; cached per process
    (read-only arrays, so no caller can change the cached copy)."""
    for name, value in (("train", train), ("test", test), ("classes", classes), ("size", size)):
        if value < 1:
            raise ValueError(f"generate_glyphs: {name} must be >= 1, got {value}")
    arrays = (*_render(seed, "train", train, classes, size), *_render(seed, "test", test, classes, size))
    for array in arrays:
        array.setflags(write=False)
    return arrays
