"""Exports scikit-learn's digits set to smskd_fast/data/digits.npz (run once; needs scikit-learn).

The split is fixed here, once, so that the package needs no scikit-learn at run
time and every user trains and tests on the same images: a stratified 80/20 split
drawn with seed 0.
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def main() -> None:
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen = rng.choice(members, size=round(0.2 * len(members)), replace=False)
        test_mask[chosen] = True
    out = Path(__file__).resolve().parents[1] / "smskd_fast" / "data" / "digits.npz"
    np.savez_compressed(
        out,
        train_images=images[~test_mask], train_labels=labels[~test_mask],
        test_images=images[test_mask], test_labels=labels[test_mask],
    )
    print(f"wrote {out}: {int((~test_mask).sum())} train, {int(test_mask.sum())} test")


if __name__ == "__main__":
    main()
