// A float64 oracle of the top-k teacher form (smskd_fast/backends/topk.py), one row at a
// time, written as plain two-pass loops: the kept classes' p_c = exp(v_c/T - lse_T),
// the rest's mass p_rest = 1 - sum p_c (as -expm1 of their log-sum-exp) spread
// like the student's q over the classes not kept, KD = T^2 KL(p~ || q), and
// the dense CE and reference terms (SPEC.md section 2).
#pragma once

#include <cmath>
#include <vector>

#include "smskd_oracle.h"

namespace smskd {
namespace oracle {

struct TopKRow {
  std::vector<double> values;    // k teacher logits, as the kernel sees them (float32)
  std::vector<int64_t> indices;  // k distinct classes
  double true_logit = 0, lse = 0, lse_t = 0;
};

inline double log_sum_exp(const std::vector<double>& x) {
  double m = -INFINITY;
  for (double v : x) m = std::max(m, v);
  if (m == -INFINITY) return m;
  double s = 0;
  for (double v : x) s += std::exp(v - m);
  return m + std::log(s);
}

inline RowWant topk_oracle(const std::vector<double>& s, const std::vector<double>* r, int64_t y, bool has_target,
                           const TopKRow& t, const smskd_loss_rows_args& a) {
  RowWant w;
  const size_t C = s.size(), K = t.values.size();
  w.grad.assign(C, 0.0);
  if (has_target && y == a.ignore_index) return w;
  const double T = a.temperature;
  const auto ls1 = log_softmax(s, 1.0), lsT = log_softmax(s, 1.0 / T);
  if (has_target) w.ce = -ls1[y];
  std::vector<double> p_tilde(C, 0.0), log_p(K);
  std::vector<bool> kept(C, false);
  double coarse_kl = 0, mass = 0;
  for (size_t c = 0; c < K; ++c) {
    log_p[c] = t.values[c] / T - t.lse_t;
    const double p = std::exp(log_p[c]);
    kept[t.indices[c]] = true;
    if (p != 0) {
      coarse_kl += p * (log_p[c] - lsT[t.indices[c]]);
      mass += p;
      p_tilde[t.indices[c]] = p;
    }
  }
  if (K < C) {
    const double p_rest = std::max(-std::expm1(log_sum_exp(log_p)), 0.0);
    std::vector<double> rest;
    for (size_t j = 0; j < C; ++j)
      if (!kept[j]) rest.push_back(lsT[j]);
    const double log_q_rest = log_sum_exp(rest);
    if (p_rest > 0) {
      coarse_kl += p_rest * (std::log(p_rest) - log_q_rest);
      mass += p_rest;
      for (size_t j = 0; j < C; ++j)
        if (!kept[j]) p_tilde[j] = p_rest * std::exp(lsT[j] - log_q_rest);
    }
  }
  w.kd = T * T * coarse_kl;
  if (has_target) w.tcp = std::exp(t.true_logit - t.lse);
  if (a.weighting == SMSKD_WEIGHT_CONSTANT) {
    w.weight = 1.0;
  } else if (has_target) {
    w.weight = a.weighting == SMSKD_WEIGHT_TCP ? w.tcp : 1.0 - w.tcp;
  }
  std::vector<double> lrT;
  if (r) {
    lrT = log_softmax(*r, 1.0 / T);
    w.ref = T * T * w.weight * kl(lrT, lsT);
  }
  w.loss = a.ce_weight * w.ce + a.kd_weight * w.kd + a.ref_weight * w.ref;
  for (size_t j = 0; j < C; ++j) {
    const double q = std::exp(lsT[j]);
    double g = T * a.kd_weight * (q * mass - p_tilde[j]);
    if (has_target) g += a.ce_weight * (std::exp(ls1[j]) - (int64_t(j) == y ? 1.0 : 0.0));
    if (r) g += T * a.ref_weight * w.weight * (q - std::exp(lrT[j]));
    w.grad[j] = g;
  }
  return w;
}

}  // namespace oracle
}  // namespace smskd
