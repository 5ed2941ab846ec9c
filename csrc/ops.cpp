// Operator schemas of the smskd_fast library.
//
// Every compiled backend (CPU here, CUDA in csrc/cuda) implements these schemas
// with TORCH_LIBRARY_IMPL; the Python side (smskd_fast/ops/registration.py) adds the fake
// (meta) kernels and the autograd formula. The math is SPEC.md section 2.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing smskd_fast._C loads this shared object, which runs the static
// TORCH_LIBRARY registrations below; the module itself has no Python members.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "smskd_fast compiled operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(smskd_fast, m) {
  // Per-row fused loss over (N, C) logits. Outputs, each of length N and in the
  // accumulation dtype (float32, or float64 for float64 inputs):
  //   loss = ce_weight*ce + kd_weight*kd + ref_weight*ref, and the terms ce, kd,
  //   ref (= T^2 * w * KL), tcp and weight; plus grad = dloss_i/dstudent_i in the
  //   student's dtype, shape (N, C) when compute_grad else (0, C).
  // weighting is "inverse_tcp", "tcp" or "constant"; rows whose target equals
  // ignore_index give zeros everywhere.
  m.def(
      "smskd_loss_rows(Tensor student, Tensor? target, Tensor? teacher, "
      "Tensor? reference, float temperature, float ce_weight, float kd_weight, "
      "float ref_weight, str weighting, int ignore_index, bool compute_grad) "
      "-> (Tensor loss, Tensor ce, Tensor kd, Tensor ref, Tensor tcp, "
      "Tensor weight, Tensor grad)");
  // The same loss and outputs with the teacher in the top-k form of a logit
  // cache (smskd_fast/backends/topk.py): per row its k largest logits (values, (N, k))
  // and their classes (indices, (N, k)), the true-class logit and the row's
  // log-sum-exp at T = 1 and at the loss temperature ((N,) each). TCP is exact;
  // KD is the coarsened KL (kept classes exact, the rest spread like the student).
  m.def(
      "smskd_loss_rows_topk(Tensor student, Tensor? target, Tensor topk_values, "
      "Tensor topk_indices, Tensor true_logit, Tensor log_sum_exp, "
      "Tensor log_sum_exp_at_temperature, Tensor? reference, float temperature, "
      "float ce_weight, float kd_weight, float ref_weight, str weighting, "
      "int ignore_index, bool compute_grad) "
      "-> (Tensor loss, Tensor ce, Tensor kd, Tensor ref, Tensor tcp, "
      "Tensor weight, Tensor grad)");
  // The same loss with the gradient written over the student logits (a GPU
  // option, LossOptions.overwrite_student_logits): no N x C gradient buffer;
  // student's columns must be contiguous. Returns the six per-row outputs.
  m.def(
      "smskd_loss_rows_inplace_(Tensor(a!) student, Tensor? target, Tensor? teacher, "
      "Tensor? reference, float temperature, float ce_weight, float kd_weight, "
      "float ref_weight, str weighting, int ignore_index) "
      "-> (Tensor loss, Tensor ce, Tensor kd, Tensor ref, Tensor tcp, Tensor weight)");
}
