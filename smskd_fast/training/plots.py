"""PNG plots of a finished run: accuracy and loss over all stages, and the TCP weight distribution."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import List

from smskd_fast.training.atomic_io import write_atomic_reported
from smskd_fast.training.optional_packages import require_matplotlib
from smskd_fast.training.run_files import read_jsonl

__all__ = ["plot_run"]


def _stage_boundaries(axis, records) -> None:
    for previous, record in zip(records, records[1:]):
        if record["stage"] != previous["stage"]:
            axis.axvline(previous["global_epoch"] + 0.5, color="grey", linestyle=":", linewidth=1)


def _save_png(figure, path: Path) -> Path:
    """The figure as path, written atomically: a full disk leaves no truncated PNG and is reported
    as a CheckpointWriteError naming the file, as for every other run file."""
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    plt.close(figure)
    write_atomic_reported(path, lambda handle: handle.write(image.getvalue()))
    return path


def plot_run(run_dir: Path) -> List[Path]:
    """Writes accuracy.png, loss.png and tcp_weights.png into run_dir; returns their paths."""
    matplotlib = require_matplotlib("the run's PNG plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    epochs = [r["global_epoch"] for r in records]
    written = []
    for name, series in (("accuracy", (("train_acc", "train"), ("test_acc", "test"))),
                         ("loss", (("train_loss", "train (total)"), ("train_ce", "train CE"),
                                   ("train_ref", "train reference term"), ("test_loss", "test CE")))):
        figure, axis = plt.subplots(figsize=(7, 4))
        for key, label in series:
            axis.plot(epochs, [r[key] for r in records], label=label)
        _stage_boundaries(axis, records)
        axis.set_xlabel("epoch (all stages; dotted lines separate stages)")
        axis.set_ylabel("accuracy (%)" if name == "accuracy" else "loss")
        axis.legend()
        figure.tight_layout()
        written.append(_save_png(figure, run_dir / f"{name}.png"))
    weights_file = run_dir / "tcp_weights.json"
    if weights_file.is_file():
        weights = json.loads(weights_file.read_text())
        if weights["counts"]:
            figure, axis = plt.subplots(figsize=(7, 4))
            edges = weights["bins"]
            centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
            width = (edges[1] - edges[0]) / (len(weights["counts"]) + 1)
            for offset, (stage, counts) in enumerate(weights["counts"].items()):
                total = max(sum(counts), 1)
                axis.bar([c + (offset - len(weights["counts"]) / 2) * width for c in centers],
                         [c / total for c in counts], width=width, label=stage)
            axis.set_xlabel("reference weight w_i (last epoch of each stage)")
            axis.set_ylabel("fraction of samples")
            axis.legend()
            figure.tight_layout()
            written.append(_save_png(figure, run_dir / "tcp_weights.png"))
    return written
