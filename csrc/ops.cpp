// Every neurokern op schema, in one place. Semantics: docs/ops.md and
// neurokern/ops/reference.py (the pure-PyTorch statement of each op).
//
// Conventions shared by all ops:
// - `finetuned` holds the T fine-tuned versions of `base`; task vectors tau_t = finetuned[t] - base
//   are formed on the fly in fp32, whatever the storage dtype (float32, bfloat16, float16).
//   Ops over a list of tensors take finetuned task-major: finetuned[t * n + i] belongs to base[i].
// - Finite inputs near the float32 / bfloat16 maximum can give |tau| > 3.4e38, which float32 holds
//   as +-inf. The trim still decides on that float32 |tau| (+inf ranks above every finite one); the
//   float64 reductions read the float64 difference there, and the element-wise ops (weighted_sum,
//   ties_merge, dare) compute every element whose float32 result (or "sum" vote) is NaN / Inf again
//   in float64 from the float64 task vectors, rounded once to float32 and then to the output dtype.
//   A merged value beyond the output dtype's range is stored as +-inf (the methods raise for it).
// - Trim: with `threshold` (float32 [T]) and `tie_limit` (int64 [T]) given, an entry of task t at
//   flat position p (= offset + index inside the tensor) is kept iff
//   |tau| > threshold[t]  or  (|tau| == threshold[t] and p < tie_limit[t]); otherwise it reads as 0.
//   magnitude_threshold produces such pairs. Without them nothing is trimmed.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing neurokern._C registers the ops below; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(neurokern, m) {
  // Exact k-th largest |tau_t| (k[t], 1-based) over all entries of all tensors (global scope), or per
  // tensor (per_tensor: k has n*T entries, k[i*T+t], outputs are [n, T]). keep_ties keeps every
  // entry equal to the threshold; otherwise tie_limit keeps exactly k entries, ties broken by
  // lowest flat position. k <= 0 keeps nothing (threshold +inf); k >= N keeps everything.
  // nonfinite (int32 [n], on the inputs' device), when given, is set to 1 where some tau_t of
  // tensor i holds a NaN or Inf and to 0 elsewhere (on a GPU in the pass that reads everything).
  m.def(
      "magnitude_threshold(Tensor[] base, Tensor[] finetuned, int[] k, bool keep_ties=True, "
      "bool per_tensor=False, Tensor(a!)? nonfinite=None) -> (Tensor threshold, Tensor tie_limit)");
  // Per task: (sum |tau_t|, sum |trim(tau_t)|) over all tensors, float64 [T, 2].
  m.def(
      "trim_l1(Tensor[] base, Tensor[] finetuned, Tensor? threshold=None, Tensor? tie_limit=None) "
      "-> Tensor");
  // Per row k of a 2-D base (a neuron w): gram[k,s,t] = <tau_s, tau_t>, dots[k,t] = <tau_t, w>,
  // sqnorm[k] = |w|^2 of the trimmed task vectors; float64, accumulated in float64.
  m.def(
      "neuron_stats(Tensor base, Tensor[] finetuned, Tensor? threshold=None, "
      "Tensor? tie_limit=None, int offset=0) -> (Tensor gram, Tensor dots, Tensor sqnorm)");
  // Per row: c_t = <tau_t, w>/|w|^2 (0 where w = 0) as float32 [R, T], and the orthogonal residuals
  // tau_t - c_t w as T float32 tensors [R, C].
  m.def(
      "subspace_split(Tensor base, Tensor[] finetuned, Tensor? threshold=None, "
      "Tensor? tie_limit=None, int offset=0) -> (Tensor coeff, Tensor[] orthogonal)");
  // NeuroMerging's per-row solve from neuron_stats: coefficients a [T+1, R] (float32) such that the
  // merged row is a[0] * w + sum_t a[t+1] * trim(tau_t). parallel_basis: "unit" | "neuron";
  // gamma: cumulative-variance rank cut-off (1.0 keeps every component).
  m.def(
      "neuromerge_coeffs(Tensor gram, Tensor dots, Tensor sqnorm, float lambda_parallel, "
      "float lambda_orthogonal, str parallel_basis=\"unit\", float gamma=1.0) -> Tensor");
  // out = a[0] * base + sum_t a[t+1] * trim(tau_t); coeffs (float32) are [T+1] (per tensor),
  // [T+1, R] (per row) or [T+1, *base.shape] (per element). out dtype: out_dtype or base's.
  m.def(
      "weighted_sum(Tensor base, Tensor[] finetuned, Tensor coeffs, Tensor? threshold=None, "
      "Tensor? tie_limit=None, int offset=0, ScalarType? out_dtype=None) -> Tensor");
  // d out / d coeffs: <grad, base> and <grad, trim(tau_t)> reduced to the shape of coeffs (float32).
  m.def(
      "weighted_sum_backward(Tensor grad, Tensor base, Tensor[] finetuned, Tensor coeffs, "
      "Tensor? threshold=None, Tensor? tie_limit=None, int offset=0) -> Tensor");
  // TIES: d_t = weights[t] * trim(tau_t); elect per element on d_t (elect_weighted) or trim(tau_t),
  // consensus "sum" (sign of the sum) or "count" (sign of the sum of signs); a zero vote takes +1
  // (zero_sign "positive", mergekit) or the tensor's majority sign ("majority", TIES/NeuroMerging
  // reference); disjoint sum of the agreeing d_t divided per normalize "weights" | "count" | "none";
  // out = base + scale * that, in base's dtype.
  m.def(
      "ties_merge(Tensor base, Tensor[] finetuned, float[] weights, Tensor? threshold=None, "
      "Tensor? tie_limit=None, int offset=0, str consensus=\"sum\", str normalize=\"weights\", "
      "bool elect_weighted=True, str zero_sign=\"positive\", float scale=1.0) -> Tensor");
  // DARE: keep entry i of tau_t iff its 32-bit draw (Philox-4x32-10 keyed by keys[t], counter =
  // element index: the same mask on every device) is below t = floor(density * 2^32 + 0.5), i.e.
  // with probability p = t / 2^32 (csrc/philox.h); rescale kept entries by 1/p ("density": the
  // expectation is tau_t exactly), by |tau_t|_1 / |kept|_1 ("l1", mergekit) or not ("none"); then either a weighted
  // sum (consensus "none") or TIES election ("sum" | "count", mergekit rules); normalize as in
  // ties_merge; out = base + scale * that, in base's dtype.
  m.def(
      "dare(Tensor base, Tensor[] finetuned, float[] weights, float density, int[] keys, "
      "str rescale=\"density\", str consensus=\"none\", str normalize=\"none\", float scale=1.0) "
      "-> Tensor");
  // Multi-tensor forms: the op above applied to every base[i] (with its fine-tuned versions
  // finetuned[t * n + i]) in one call, one launch on the GPU; one output per tensor. Tensor i's flat
  // positions start at offsets[i] (empty: all 0). threshold / tie_limit are [T] (one trim scope for
  // every tensor) or [n, T] (row i trims tensor i). weighted_sum_multi: coeffs are float32 [n, T+1],
  // row i per tensor i; its backward returns d/d coeffs, float32 [n, T+1]. dare_multi: keys [n * T],
  // keys[i * T + t] for tensor i, task t.
  m.def(
      "weighted_sum_multi(Tensor[] base, Tensor[] finetuned, Tensor coeffs, Tensor? threshold=None, "
      "Tensor? tie_limit=None, int[] offsets=[], ScalarType? out_dtype=None) -> Tensor[]");
  m.def(
      "weighted_sum_multi_backward(Tensor[] grad, Tensor[] base, Tensor[] finetuned, Tensor coeffs, "
      "Tensor? threshold=None, Tensor? tie_limit=None, int[] offsets=[]) -> Tensor");
  m.def(
      "ties_merge_multi(Tensor[] base, Tensor[] finetuned, float[] weights, Tensor? threshold=None, "
      "Tensor? tie_limit=None, int[] offsets=[], str consensus=\"sum\", str normalize=\"weights\", "
      "bool elect_weighted=True, str zero_sign=\"positive\", float scale=1.0) -> Tensor[]");
  // ties_merge_multi with flags of outputs holding NaN / Inf (ops.ties_merge_multi(nonfinite=): the
  // NaN / Inf check of TIES and NeuroMerging): nonfinite (int32 [n], on the inputs' device), when
  // given, is set to 1 where output i, as stored in its dtype, holds a NaN or Inf and to 0
  // elsewhere, in the merge's own pass (on the GPU for T > 8, where each tensor merges alone, by
  // nonfinite_flags of the outputs). Internal, as _weighted_sum_multi_triton: torch.compile cannot
  // functionalize an op that mutates an argument and returns a list, so ties_merge_multi takes none.
  m.def(
      "_ties_merge_multi_flagged(Tensor[] base, Tensor[] finetuned, float[] weights, Tensor? threshold=None, "
      "Tensor? tie_limit=None, int[] offsets=[], str consensus=\"sum\", str normalize=\"weights\", "
      "bool elect_weighted=True, str zero_sign=\"positive\", float scale=1.0, Tensor(a!)? nonfinite=None) "
      "-> Tensor[]");
  m.def(
      "dare_multi(Tensor[] base, Tensor[] finetuned, float[] weights, float density, int[] keys, "
      "str rescale=\"density\", str consensus=\"none\", str normalize=\"none\", float scale=1.0) "
      "-> Tensor[]");
  // neuron_stats of every 2-D base[i] in one call, one launch per storage dtype on the GPU: the rows
  // of all tensors concatenated in list order (gram [sum R, T, T], dots [sum R, T], sqnorm [sum R]).
  m.def(
      "neuron_stats_multi(Tensor[] base, Tensor[] finetuned, Tensor? threshold=None, "
      "Tensor? tie_limit=None, int[] offsets=[]) -> (Tensor gram, Tensor dots, Tensor sqnorm)");
  // weighted_sum with per-row coefficients of every 2-D base[i] in one call (one launch per storage
  // dtype on the GPU): coeffs are float32 [T+1, sum R], tensor i's rows at its first row in list
  // order (neuron_stats_multi's rows, as neuromerge_coeffs returns them). Not differentiable.
  m.def(
      "weighted_sum_rows_multi(Tensor[] base, Tensor[] finetuned, Tensor coeffs, "
      "Tensor? threshold=None, Tensor? tie_limit=None, int[] offsets=[], ScalarType? out_dtype=None) "
      "-> Tensor[]");
  // The routing of a batch that mixes tasks: a stable sort of the rows by task id. perm [B] and
  // bounds [T+1] (int64, on task_ids' device): the rows of task t are perm[bounds[t]:bounds[t+1]],
  // in batch order. The ids must lie in [0, num_tasks) (not checked: the result is unspecified
  // otherwise).
  m.def("tinted_route(Tensor task_ids, int num_tasks) -> (Tensor perm, Tensor bounds)");
  // Task-routed linear layer: y[b] = x[b] @ weight[task_ids[b]]^T + bias[task_ids[b]]; weight may
  // have any strides (its backward reads it transposed, without a copy). Without perm and bounds
  // the op routes the rows and checks the ids itself; with them (tinted_route of these task_ids,
  // computed once for many calls) it does neither.
  m.def(
      "tinted_linear(Tensor x, Tensor weight, Tensor? bias, Tensor task_ids, Tensor? perm=None, "
      "Tensor? bounds=None) -> Tensor");
  // Its weight gradient: dW[t] = sum over rows b of task t of grad[b]^T x[b], [T, out, in]; perm
  // and bounds as for tinted_linear.
  m.def(
      "tinted_linear_weight_grad(Tensor grad, Tensor x, Tensor task_ids, int num_tasks, "
      "Tensor? perm=None, Tensor? bounds=None) -> Tensor");
  // Rows of a LoRA-adapted weight, in place: rows (rows [first, first + n) of the weight, float32,
  // bfloat16 or float16) += the same rows of ΔW = scale·B·A (A [r, in], B [out, r], of one dtype;
  // transposed: ΔW = (B·A)^T, embeddings' and fan_in_fan_out layers'), as PEFT's get_delta_weight
  // and merge compute them on a CPU, bitwise: the factors' product in float32, times scale (a
  // float32), rounded to the factors' dtype, added to the row in float32 and rounded once to the
  // weight's dtype (an embedding's ΔW rounded to the weight's dtype first). ΔW is formed over blocks
  // of a multiple of 16 rows (or all its rows), whose product a CPU BLAS forms as the whole one's.
  // A CPU kernel only, none for GPUs: the engine's reader threads form adapted weights on the host.
  m.def(
      "lora_add_rows(Tensor(a!) rows, Tensor A, Tensor B, float scale, bool transposed=False, "
      "bool embedding=False, int first=0) -> ()");
  // Histograms of the task vectors' magnitude keys (the int32 bits of |float32(ft) - float32(base)|)
  // over a list, for the exact global trims: without hi_bin, hist [T, 2^15] += the count of each
  // key >> 16 per task; with hi_bin (int32 [T]), hist [T, 2^16] += the count of key & 0xFFFF among
  // the keys with key >> 16 == hi_bin[t] (hi_bin[t] < 0: none), and counts [n, T] receives how many
  // each (tensor, task) holds. boundary_values gathers those keys' low 16 bits, (tensor, task)
  // after (tensor, task) in the order of the flat counts. Their kernels are Python
  // (neurokern/ops/key_histogram.py; Triton on CUDA).
  m.def(
      "key_histogram(Tensor[] base, Tensor[] finetuned, Tensor(a!) hist, Tensor? hi_bin=None, "
      "Tensor(b!)? counts=None) -> ()");
  m.def("boundary_values(Tensor[] base, Tensor[] finetuned, Tensor hi_bin, int[] counts) -> Tensor");
  // Which tensors of a list hold a NaN or Inf: int32 [n] on their device, 1 there, 0 elsewhere.
  // Its kernels are Python (neurokern/ops/finite.py; Triton on CUDA).
  m.def("nonfinite_flags(Tensor[] tensors) -> Tensor");
  // Internal (csrc/launch_table.cpp): the host side of the Triton launches over a list of tensors
  // (neurokern/ops/triton/lists.py and the op modules beside it) in one call: argument checks,
  // grouping by storage dtype, each group's launch table and owner array on the device, outputs.
  m.def(
      "_launch_table(str op, Tensor[] base, Tensor[] finetuned, Tensor[]? grad, int[]? offsets, "
      "int per_program, str layout, bool outputs, ScalarType? out_dtype) "
      "-> (Tensor[] outputs, Tensor[] grad, Tensor[] tables, int[] info)");
  m.def(
      "_finite_table(Tensor[] tensors, int block_bytes) "
      "-> (Tensor[] tables, Tensor[] copies, int[] info, int[] others)");
  // Internal (csrc/list_launch.cpp): weighted_sum_multi's CUDA kernel on any device (the CPU tests
  // run it with Triton interpreted), the Triton launch of one of its tables (implemented in
  // neurokern/ops/triton/weighted_sum.py: table, owner, coeffs rows, trims, the first tensor's base and
  // output for their dtypes, tensor count, program count, T, per-tensor trims, aligned, the flags),
  // and the Triton side's constants it lays out launches with. nonfinite (int32 [n], on the
  // inputs' device), when given, is set to 1 where output i holds a NaN or Inf and to 0 elsewhere,
  // in the kernel's own pass (weighted_sum_multi itself takes no such argument: an op with one
  // cannot have an autograd formula).
  m.def(
      "_weighted_sum_multi_triton(Tensor[] base, Tensor[] finetuned, Tensor coeffs, Tensor? threshold=None, "
      "Tensor? tie_limit=None, int[] offsets=[], ScalarType? out_dtype=None, Tensor(a!)? nonfinite=None) "
      "-> Tensor[]");
  m.def(
      "_ws_multi_launch(Tensor table, Tensor owner, Tensor coeffs, Tensor? threshold, Tensor? tie_limit, "
      "Tensor like_in, Tensor like_out, int nt, int programs, int T, bool trim_rows, bool aligned, "
      "Tensor(a!)? nonfinite=None) -> ()");
  m.def("_triton_list_config(int block, int max_tasks) -> ()");
}
