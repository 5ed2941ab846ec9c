"""smskd-fast: fused knowledge-distillation losses and sequential multi-stage KD (SMSKD)."""
from ._extension import extension_loaded
from . import ops  # noqa: F401  registers fake/autograd for the compiled operators
from .backends import available_backends
from .functional import SMSKDLossOutput, kd_loss, smskd_loss, true_class_probability
from .fused_linear import fused_linear_smskd_loss
from .nn import KDLoss, SMSKDLoss

__version__ = "0.1.0"

__all__ = [
    "SMSKDLossOutput",
    "SMSKDLoss",
    "KDLoss",
    "available_backends",
    "extension_loaded",
    "fused_linear_smskd_loss",
    "kd_loss",
    "smskd_loss",
    "true_class_probability",
]
