"""smskd-fast: fused knowledge-distillation losses and sequential multi-stage KD (SMSKD)."""
from smskd_fast.ops.extension import extension_loaded
from smskd_fast.ops import registration  # noqa: F401  registers fake/autograd for the compiled operators
from smskd_fast.backends import available_backends
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.loss.functional import SMSKDLossOutput, kd_loss, smskd_loss, true_class_probability
from smskd_fast.loss.fused_linear import fused_linear_smskd_loss
from smskd_fast.loss.nn import KDLoss, SMSKDLoss

__version__ = "0.1.0"

__all__ = [
    "SMSKDLossOutput",
    "SMSKDLoss",
    "TopKTeacher",
    "KDLoss",
    "available_backends",
    "extension_loaded",
    "fused_linear_smskd_loss",
    "kd_loss",
    "smskd_loss",
    "true_class_probability",
]
