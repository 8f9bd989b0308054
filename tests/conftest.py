import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
