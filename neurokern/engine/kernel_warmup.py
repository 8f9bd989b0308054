"""The first Triton launch of a process pays for the Triton runtime (its driver setup, and the hash
of its sources that keys the kernel cache): about a second on the H100 machines, and each kernel
then its load from the cache. A merge on a GPU pays that on a thread of its own from the moment
the device is known (while the plan is made and the first inputs are read), by running the finite
check (the first kernel of every pass) on tiny tensors of the dtypes the engine merges."""
import threading

import torch

from neurokern.ops import triton as triton_kernels


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def start(device: torch.device) -> None:
    if device.type != "cuda" or not triton_kernels.AVAILABLE:
        return

    def warm() -> None:
        try:
            with torch.cuda.device(device):
                triton_kernels.finite.nonfinite_flags([torch.zeros(16, dtype=d, device=device) for d in DTYPES])
        except Exception:  # noqa: BLE001 (the merge launches the kernel itself and reports what fails)
            pass

    threading.Thread(target=warm, name="neurokern-kernel-warmup", daemon=True).start()
