"""Checkpoints: the run's latest.pt and stageK.pt files, model files, and resume.

latest.pt (after every epoch) holds the student, the stage's method modules and the
optimizer, so a run resumed from any epoch boundary ends as one never stopped; stageK.pt
(after stage K) holds the student that is stage K+1's reference. Every file is written
atomically (atomic_io), by the main process only; resume repairs what a kill between two
writes left behind. Model files (student.pt, teachers) describe themselves: zoo name,
class count, input channels and weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from smskd_fast.training.atomic_io import write_atomic_reported

__all__ = ["save_atomic", "save_model_file", "load_model_file", "load_weights", "RunCheckpoints", "ResumePoint",
           "RESUME_REMEDY"]

RESUME_REMEDY = "resume with the run's own config (no --set that changes its models or methods)"


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then os.replace: a reader never sees half a file.
    A failed write (e.g. a full disk) raises CheckpointWriteError and leaves the previous file as it was."""
    write_atomic_reported(Path(path), lambda handle: torch.save(obj, handle))


def save_model_file(model: nn.Module, name: str, num_classes: int, in_channels: int, path: Path) -> None:
    """A self-describing model file: zoo name, class count, input channels and weights."""
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    save_atomic({"model": name, "num_classes": num_classes, "in_channels": in_channels, "state_dict": state}, path)


def load_model_file(path: Path, expected_name: Optional[str] = None,
                    map_location: str = "cpu") -> Dict[str, Any]:
    """Reads a model file written by save_model_file; checks its model name when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found (train one with `smskd-fast train-teacher`)")
    try:
        entry = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, not a torch file, or pickled objects that weights_only refuses
        raise ValueError(f"{path} is not a readable model file ({type(error).__name__}); give a file "
                         "written by `smskd-fast train` or `smskd-fast train-teacher` (student.pt)") from None
    if not isinstance(entry, dict) or "state_dict" not in entry or "model" not in entry:
        raise ValueError(f"{path} is not a smskd-fast model file (it has no 'model' and 'state_dict' entries); "
                         "give a student.pt written by `smskd-fast train` or `smskd-fast train-teacher`")
    if expected_name is not None and entry.get("model") != expected_name:
        raise ValueError(f"{path} holds model {entry.get('model')!r}, but the config names {expected_name!r}; "
                         f"name {entry.get('model')!r} in the config or give a {expected_name!r} model file")
    return entry


def load_weights(model: nn.Module, state_dict: Dict[str, Any], source: str,
                 remedy: str = "give weights saved for this model") -> None:
    """model.load_state_dict(state_dict) with a one-line error that says where the weights came from."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0] if lines else "")[:160]
        raise ValueError(f"the weights in {source} do not fit the model they are loaded into (saved for another "
                         f"architecture, class count or method set); {remedy}. First difference: {first}") from None



@dataclass
class ResumePoint:
    """Where a run (re)starts: the 0-based stage and epoch, the epochs done over all stages, the TCP-weight
    histograms of the finished stages, and latest.pt's entries when the run stopped inside that stage."""

    stage: int = 0
    epoch: int = 0
    global_epoch: int = 0
    histograms: Dict[str, Any] = field(default_factory=dict)
    latest: Optional[Dict[str, Any]] = None

    def restore_stage(self, index: int, methods: nn.Module, optimizer: torch.optim.Optimizer, source: str) -> int:
        """Loads the methods and optimizer of the stage stopped inside; returns stage `index`'s first epoch."""
        if index != self.stage:
            return 0
        if self.latest is not None:
            load_weights(methods, self.latest["methods"], source, RESUME_REMEDY)
            optimizer.load_state_dict(self.latest["optimizer"])
        return self.epoch


class RunCheckpoints:
    """The checkpoint files of one run directory, under checkpoints/; only the main process writes."""

    def __init__(self, run_dir: Path, device: torch.device, is_main: bool):
        self.folder, self.device, self.is_main = Path(run_dir) / "checkpoints", device, is_main

    @property
    def latest_path(self) -> Path:
        return self.folder / "latest.pt"

    def stage_path(self, index: int) -> Path:
        return self.folder / f"stage{index + 1}.pt"

    def load_stage(self, index: int) -> Dict[str, Any]:
        return torch.load(self.stage_path(index), map_location=self.device, weights_only=True)

    def save_stage(self, index: int, student: Dict[str, Any], methods: Dict[str, Any]) -> None:
        """stageK.pt: the student (state dict) as stage `index` ended it, and the stage's methods."""
        if self.is_main:
            save_atomic({"student": student, "methods": methods, "stage": index}, self.stage_path(index))

    def save_latest(self, stage: int, epochs_done: int, global_epoch: int, student: nn.Module, methods: nn.Module,
                    optimizer: torch.optim.Optimizer, histograms: Dict[str, Any]) -> None:
        """latest.pt: everything a resume from this epoch boundary needs."""
        if self.is_main:
            save_atomic({
                "stage": stage, "epochs_done": epochs_done, "global_epoch": global_epoch,
                "student": student.state_dict(), "methods": methods.state_dict(),
                "optimizer": optimizer.state_dict(), "histograms": histograms,
            }, self.latest_path)

    def _load_latest(self) -> Dict[str, Any]:
        try:
            return torch.load(self.latest_path, map_location=self.device, weights_only=True)
        except Exception as error:  # checkpoints are written atomically: only outside damage gets here
            raise ValueError(f"cannot resume: {self.latest_path} is unreadable ({type(error).__name__}); the stage "
                             f"checkpoints beside it may still be read, or start again with another --out") from None

    def resume(self, student: nn.Module, stage_epochs: List[int]) -> ResumePoint:
        """Loads latest.pt's student into `student` and says where to go on. A run stopped after its
        stage's last epoch but before stageK.pt was written gets that file now (from latest.pt)."""
        if not self.latest_path.is_file():
            raise FileNotFoundError(f"cannot resume: {self.latest_path} not found; {self.folder.parent} holds no "
                                    "started run (start one with `smskd-fast train --config FILE --out RUN_DIR`)")
        latest = self._load_latest()
        load_weights(student, latest["student"], str(self.latest_path), RESUME_REMEDY)
        point = ResumePoint(latest["stage"], latest["epochs_done"], latest["global_epoch"], latest["histograms"],
                            latest)
        if point.epoch == stage_epochs[point.stage]:  # the stage was done
            if not self.stage_path(point.stage).is_file():  # stopped between the two writes
                self.save_stage(point.stage, latest["student"], latest["methods"])
            point.stage, point.epoch, point.latest = point.stage + 1, 0, None
        return point
