"""Kernel-level profile of magnitude_threshold and the TIES pieces on the 1.1B-shaped set."""
import torch
from bench.kernels import bench, lists, make_models, tinyllama_shapes
from neurokern import ops
import neurokern as nk
T = 4
base, fts = make_models(tinyllama_shapes(22), T, torch.device("cuda"))
names, bl, fl = lists(base, fts)
N = sum(b.numel() for b in bl)
kg = [max(1, int(0.2 * N))] * T
kt = [max(1, int(0.2 * b.numel())) for b in bl for _ in range(T)]
cases = {"global_keep": lambda: ops.magnitude_threshold(bl, fl, kg, True),
         "tensor_exact": lambda: ops.magnitude_threshold(bl, fl, kt, False, per_tensor=True),
         "ties": lambda: nk.merge(base, fts, method="ties", density=0.2)}
for name, fn in cases.items():
    print(name, f"{bench(fn):.3f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
