"""An independent float64 NumPy transcription of SPEC.md section 2, used as the test oracle.

Written row by row from the formulas (the one-pass KL identity and the closed-form
gradient), sharing no code with any backend.
"""
from __future__ import annotations

import numpy as np


def lse(x: np.ndarray) -> float:
    m = np.max(x)
    if m == -np.inf:
        return -np.inf
    return float(m + np.log(np.sum(np.exp(x - m))))


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(x - lse(x))


def kl(x: np.ndarray, z: np.ndarray, T: float) -> float:
    """KL(softmax(x/T) || softmax(z/T)) = sum_c p_c (x_c - z_c)/T - lse(x/T) + lse(z/T)."""
    p = softmax(x / T)
    support = p > 0
    return float(np.sum(p[support] * (x[support] - z[support]) / T) - lse(x / T) + lse(z / T))


def closed_form(s, y, t=None, r=None, *, T=4.0, ce_weight=1.0, kd_weight=1.0, ref_weight=1.0,
                weighting="inverse_tcp", ignore_index=-100):
    """Per-row (loss, ce, kd, ref, tcp, weight) arrays and the (N, C) gradient of sum_i L_i."""
    s = np.asarray(s, dtype=np.float64)
    n, c = s.shape
    out = {key: np.zeros(n) for key in ("loss", "ce", "kd", "ref", "tcp", "weight")}
    grad = np.zeros((n, c))
    for i in range(n):
        if y is not None and y[i] == ignore_index:
            continue
        ps = softmax(s[i])
        ps_T = softmax(s[i] / T)
        g = np.zeros(c)
        if y is not None:
            out["ce"][i] = lse(s[i]) - s[i, y[i]]
            onehot = np.zeros(c)
            onehot[y[i]] = 1.0
            g += ce_weight * (ps - onehot)
        has_tcp = t is not None and y is not None
        if t is not None:
            ti = np.asarray(t[i], dtype=np.float64)
            out["kd"][i] = T * T * kl(ti, s[i], T)
            g += T * kd_weight * (ps_T - softmax(ti / T))
            if y is not None:
                out["tcp"][i] = np.exp(ti[y[i]] - lse(ti))
        w = {"inverse_tcp": 1.0 - out["tcp"][i], "tcp": out["tcp"][i], "constant": 1.0}[weighting]
        if weighting != "constant" and not has_tcp:
            w = 0.0
        out["weight"][i] = w
        if r is not None:
            ri = np.asarray(r[i], dtype=np.float64)
            out["ref"][i] = T * T * w * kl(ri, s[i], T)
            g += T * ref_weight * w * (ps_T - softmax(ri / T))
        out["loss"][i] = ce_weight * out["ce"][i] + kd_weight * out["kd"][i] + ref_weight * out["ref"][i]
        grad[i] = g
    return out, grad
