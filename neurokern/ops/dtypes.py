"""The floating-point dtypes the kernels read and write: inputs are merged in these, and the
outputs keep the base's."""
import torch

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
