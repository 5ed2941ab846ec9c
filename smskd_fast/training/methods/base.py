"""The common interface of KD methods, and feature taps that read layers by name.

A method says which layers it reads (`layer_kind`, or explicit names), builds its
own trainable modules (connectors, embedding heads, memory banks) from the shapes of
one probe batch, and returns its weighted loss for a batch. The logit KD term of
Hinton's KD is not computed here: a method reports it as `fused_kd_weight`, and the
trainer folds it into the fused smskd_loss call with the CE and reference terms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["MethodInputs", "DistillMethod", "FeatureTaps", "INPUT_SUFFIX", "check_parameter"]

INPUT_SUFFIX = ":input"


@dataclass
class MethodInputs:
    """What a method's loss may read for one batch; feature dicts are keyed by layer name."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    target: torch.Tensor
    indices: torch.Tensor
    student_features: Dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: Dict[str, torch.Tensor] = field(default_factory=dict)


class DistillMethod(nn.Module):
    """Base class: a KD method with its weight, the layers it reads and its own modules.

    layer_kind picks default layers from a zoo model's feature points:
    "none" (logits only), "hint" (the middle stage), "stages" (every stage),
    "last_stage", or "embedding" (the pooled penultimate vector).
    """

    name: ClassVar[str] = ""
    layer_kind: ClassVar[str] = "none"
    default_weight: ClassVar[float] = 1.0
    reads_teacher_logits: ClassVar[bool] = False  # needs the teacher's dense logits in MethodInputs

    def __init__(self, weight: Optional[float] = None):
        super().__init__()
        self.weight = float(self.default_weight if weight is None else weight)
        self.student_layers: List[str] = []
        self.teacher_layers: List[str] = []
        self.epoch = 0

    @property
    def fused_kd_weight(self) -> float:
        """Weight of the logit KD term that the trainer computes inside smskd_loss."""
        return 0.0

    def set_layers(self, student_layers: Sequence[str], teacher_layers: Sequence[str]) -> None:
        if len(student_layers) != len(teacher_layers):
            raise ValueError(
                f"method {self.name!r} pairs student and teacher layers one to one, got "
                f"{len(student_layers)} student layers {list(student_layers)} and "
                f"{len(teacher_layers)} teacher layers {list(teacher_layers)}"
            )
        self.student_layers, self.teacher_layers = list(student_layers), list(teacher_layers)

    def build(self, inputs: MethodInputs, num_samples: int) -> None:
        """Creates the method's trainable modules from one probe batch (no-op by default)."""

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every epoch of the stage (0-based), for warm-up schedules."""
        self.epoch = epoch

    def feature_pairs(self, inputs: MethodInputs):
        return [(inputs.student_features[s], inputs.teacher_features[t])
                for s, t in zip(self.student_layers, self.teacher_layers)]

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        """The method's weighted loss for the batch (a scalar with gradient)."""
        raise NotImplementedError


def check_parameter(method: str, name: str, value: float, valid: bool, rule: str) -> None:
    """Refuses a method parameter out of its range with an error naming it (the config's load-time
    check builds every method, so the message reaches the user with the config path)."""
    if not valid:
        raise ValueError(f"{method} parameter {name} must be {rule}, got {value!r}")


class FeatureTaps:
    """Forward hooks that record the outputs (or, with the ':input' suffix, the first
    input) of named submodules; unknown names are an error listing the known ones."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str = "model"):
        modules = dict(model.named_modules())
        self.features: Dict[str, torch.Tensor] = {}
        self._handles = []
        for name in dict.fromkeys(names):
            module_name, wants_input = (name[:-len(INPUT_SUFFIX)], True) if name.endswith(INPUT_SUFFIX) else (name, False)
            if module_name not in modules or module_name == "":
                available = [key for key in modules if key]
                raise KeyError(
                    f"{role} has no layer named {module_name!r}; available layer names: {', '.join(available)}"
                    + f" (append {INPUT_SUFFIX!r} to a name to take that layer's input)"
                )
            self._handles.append(modules[module_name].register_forward_hook(self._recorder(name, wants_input)))

    def _recorder(self, name: str, wants_input: bool):
        def record(module, args, output):
            self.features[name] = args[0] if wants_input else output
        return record

    def take(self) -> Dict[str, torch.Tensor]:
        """The features recorded since the last take()."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
