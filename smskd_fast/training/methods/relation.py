"""Relation-based methods: RKD, similarity preserving (SP), PKT and CRD with its memory bank."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smskd_fast.training.distributed import all_gather_rows, global_mean, rank, shard_sizes
from smskd_fast.training.methods.base import DistillMethod, MethodInputs, check_parameter


def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between rows, zero on the diagonal."""
    squared = x.pow(2).sum(1)
    distances = (squared[:, None] + squared[None, :] - 2 * x @ x.t()).clamp(min=eps).sqrt()
    return distances * (1 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device))


def normalized_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise distances over their mean off-diagonal value (RKD's scale-free distances).

    One row has no pair: its distances stay 0 (the mean would be 0 / 0), so the RKD distance
    term of such a batch is 0 with a zero gradient instead of NaN.
    """
    distances = pairwise_distances(x)
    mean = distances.sum() / (distances > 0).sum().clamp(min=1)
    return distances / torch.where(mean > 0, mean, torch.ones_like(mean))


def angles(x: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between i and k for every triple: (N*N*N,) values."""
    directions = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # [j, i] = x_i - x_j
    return torch.bmm(directions, directions.transpose(1, 2)).flatten()


class RKD(DistillMethod):
    """Relational KD (Park et al. 2019): smooth-L1 between normalised pairwise distances
    (weight distance_weight) and between triplet angles (angle_weight) of the embeddings.

    The distance term needs two samples and the angle term three: with fewer, each is 0 with a
    zero gradient (a last batch of one sample, or a rank's one-sample shard under DDP).
    """

    name = "rkd"
    layer_kind = "embedding"

    def __init__(self, weight=None, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__(weight)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)
        check_parameter("rkd", "distance_weight", self.distance_weight, self.distance_weight >= 0, ">= 0")
        check_parameter("rkd", "angle_weight", self.angle_weight, self.angle_weight >= 0, ">= 0")

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        total = inputs.student_logits.new_zeros(())
        for student, teacher in self.feature_pairs(inputs):
            student, teacher = student.flatten(1), teacher.flatten(1)
            with torch.no_grad():
                teacher_distances, teacher_angles = normalized_distances(teacher), angles(teacher)
            total = total + self.distance_weight * F.smooth_l1_loss(normalized_distances(student), teacher_distances)
            total = total + self.angle_weight * F.smooth_l1_loss(angles(student), teacher_angles)
        return self.weight * total


def similarity(features: torch.Tensor) -> torch.Tensor:
    flat = features.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


class SimilarityPreserving(DistillMethod):
    """SP (Tung and Mori 2019): ||G_s - G_t||_F^2 / N^2 for the row-normalised batch Gram matrices."""

    name = "sp"
    layer_kind = "last_stage"
    default_weight = 3000.0

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        total = inputs.student_logits.new_zeros(())
        for student, teacher in self.feature_pairs(inputs):
            batch = student.shape[0]
            total = total + (similarity(student) - similarity(teacher)).pow(2).sum() / batch ** 2
        return self.weight * total


def cosine_affinity(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarities mapped to [0, 1] and normalised to rows that sum to one."""
    unit = F.normalize(x.flatten(1), dim=1)
    affinity = (unit @ unit.t() + 1) / 2
    return affinity / affinity.sum(dim=1, keepdim=True)


class PKT(DistillMethod):
    """Probabilistic knowledge transfer (Passalis and Tefas 2018): KL between the teacher's and
    the student's conditional distributions built from cosine affinities of the embeddings."""

    name = "pkt"
    layer_kind = "embedding"
    default_weight = 30000.0
    eps = 1e-7

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        total = inputs.student_logits.new_zeros(())
        for student, teacher in self.feature_pairs(inputs):
            p_student, p_teacher = cosine_affinity(student), cosine_affinity(teacher)
            total = total + (p_teacher * torch.log((p_teacher + self.eps) / (p_student + self.eps))).mean()
        return self.weight * total


class CRD(DistillMethod):
    """Contrastive representation distillation (Tian et al. 2020).

    Linear heads embed the student and teacher vectors to unit length; a memory bank per
    side holds a momentum average of every training sample's embedding. Each sample is
    contrasted against `nce_k` random samples of the other side's bank with the NCE loss,
    in both directions. The banks and the normalising constants are buffers, so they
    are saved and restored with the method's state. Like BatchNorm's statistics, they
    change in training mode only: in eval mode the loss reads them as they are (an
    unset Z is estimated from the batch for that call), so scoring other data (e.g.
    a validation split, whose indices name other samples) leaves them untouched.

    Under torch.distributed every rank draws the negatives of the whole global batch and
    uses its own rows, fixes Z from the global first batch, and applies every rank's
    embeddings to its banks, so the banks stay equal on all ranks and equal to a
    single-process run's.
    """

    name = "crd"
    layer_kind = "embedding"
    default_weight = 0.8

    def __init__(self, weight=None, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07,
                 nce_m: float = 0.5):
        super().__init__(weight)
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = int(feat_dim), int(nce_k), float(nce_t), float(nce_m)
        check_parameter("crd", "feat_dim", self.feat_dim, self.feat_dim >= 1, ">= 1")
        check_parameter("crd", "nce_k", self.nce_k, self.nce_k >= 1, ">= 1 (negatives per sample)")
        check_parameter("crd", "nce_t", self.nce_t, self.nce_t > 0, "> 0")
        check_parameter("crd", "nce_m", self.nce_m, 0 <= self.nce_m < 1, "in [0, 1) (1 never updates the banks)")

    def build(self, inputs: MethodInputs, num_samples: int) -> None:
        if len(self.student_layers) != 1:
            raise ValueError(f"CRD reads exactly one student and one teacher layer, got {self.student_layers}")
        (student, teacher), = self.feature_pairs(inputs)
        self.embed_student = nn.Linear(student.flatten(1).shape[1], self.feat_dim)
        self.embed_teacher = nn.Linear(teacher.flatten(1).shape[1], self.feat_dim)
        self.num_samples = num_samples
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(num_samples, self.feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_teacher", torch.rand(num_samples, self.feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("normalizer", torch.full((2,), -1.0))  # Z for (student, teacher) scores

    def sample_negatives(self, batch: int) -> torch.Tensor:
        return torch.randint(0, self.num_samples, (batch, self.nce_k))

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        (student, teacher), = self.feature_pairs(inputs)
        v_student = F.normalize(self.embed_student(student.flatten(1)), dim=1)
        v_teacher = F.normalize(self.embed_teacher(teacher.flatten(1)), dim=1)
        indices = inputs.indices.to(v_student.device)
        sizes = shard_sizes(indices.shape[0])  # rows of every rank's shard of the global batch
        offset = sum(sizes[:rank()])
        negatives = self.sample_negatives(sum(sizes))[offset:offset + indices.shape[0]]
        contrast = torch.cat([indices[:, None], negatives.to(indices.device)], dim=1)
        # Student embedding against the teacher bank, and the teacher embedding against the student bank.
        scores_student = self._scores(self.memory_teacher[contrast], v_student, 0)
        scores_teacher = self._scores(self.memory_student[contrast], v_teacher, 1)
        if self.training:
            self._update_memory(indices, v_student.detach(), v_teacher.detach())
        return self.weight * (self._nce(scores_student) + self._nce(scores_teacher))

    def _scores(self, bank_rows: torch.Tensor, query: torch.Tensor, side: int) -> torch.Tensor:
        scores = torch.exp(torch.bmm(bank_rows.detach(), query.unsqueeze(2)).squeeze(2) / self.nce_t)
        normalizer = self.normalizer[side]
        if normalizer < 0:  # fixed once, from the first training batch, as in CRD
            normalizer = global_mean(scores.detach()) * self.num_samples
            if self.training:
                self.normalizer[side] = normalizer
        return scores / float(normalizer)

    def _nce(self, scores: torch.Tensor) -> torch.Tensor:
        """-(log D(positive) + sum log(1 - D(negatives))) averaged over the batch, with
        D(x) = x / (x + K / n): the noise is uniform over the n samples."""
        noise = self.nce_k / self.num_samples
        eps = 1e-7
        positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
        negative = torch.log(noise / (scores[:, 1:] + noise + eps))
        return -(positive.sum() + negative.sum()) / scores.shape[0]

    @torch.no_grad()
    def _update_memory(self, indices: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor) -> None:
        indices, v_student, v_teacher = all_gather_rows(indices, v_student, v_teacher)
        for memory, value in ((self.memory_student, v_student), (self.memory_teacher, v_teacher)):
            mixed = memory[indices] * self.nce_m + value * (1 - self.nce_m)
            memory.index_copy_(0, indices, F.normalize(mixed, dim=1))
