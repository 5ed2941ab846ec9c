"""The KD method zoo: one class per method, built by name with build_method."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Type

from torch import nn

from smskd_fast.training.models import feature_points
from smskd_fast.training.methods.base import DistillMethod, FeatureTaps, MethodInputs
from smskd_fast.training.methods.feature import AttentionTransfer, FitNet
from smskd_fast.training.methods.relation import CRD, PKT, RKD, SimilarityPreserving
from smskd_fast.training.methods.response import DKD, HintonKD, NoDistillation

__all__ = ["METHODS", "DistillMethod", "FeatureTaps", "MethodInputs", "build_method", "default_layers"]

METHODS: Dict[str, Type[DistillMethod]] = {
    cls.name: cls for cls in (NoDistillation, HintonKD, DKD, FitNet, AttentionTransfer, RKD,
                              SimilarityPreserving, PKT, CRD)
}


def default_layers(kind: str, model: nn.Module, role: str) -> list:
    """Layer names for a method's layer_kind, from a zoo model's declared feature points."""
    if kind == "none":
        return []
    stages, embedding = feature_points(model)
    if kind == "embedding" and embedding:
        return [embedding]
    if kind != "embedding" and stages:
        return {"hint": [stages[len(stages) // 2]], "stages": list(stages), "last_stage": [stages[-1]]}[kind]
    raise ValueError(
        f"the {role} model {type(model).__name__} declares no default {kind!r} layers; "
        f"set student_layers and teacher_layers for this method explicitly"
    )


def build_method(name: str, student: nn.Module, teacher: Optional[nn.Module], *, weight: Optional[float] = None,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None,
                 params: Optional[Dict[str, Any]] = None) -> DistillMethod:
    """A method by name with its layers resolved (explicit names win over the model defaults)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    try:
        method = cls(weight, **(params or {}))
    except TypeError as error:
        raise ValueError(f"bad parameters {params} for method {name!r}: {error}") from None
    if cls.layer_kind != "none" and teacher is None:
        raise ValueError(f"method {name!r} needs a teacher model")
    s_layers = list(student_layers) if student_layers else default_layers(cls.layer_kind, student, "student")
    t_layers = list(teacher_layers) if teacher_layers else (
        default_layers(cls.layer_kind, teacher, "teacher") if teacher is not None else [])
    if cls.layer_kind == "stages" and not (student_layers or teacher_layers) and len(s_layers) != len(t_layers):
        keep = min(len(s_layers), len(t_layers))  # pair the deepest stages
        s_layers, t_layers = s_layers[-keep:], t_layers[-keep:]
    method.set_layers(s_layers, t_layers)
    return method
