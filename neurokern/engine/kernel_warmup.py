"""The first Triton launch of a process pays for the Triton runtime: the hash of Triton's own
sources and of libtriton that keys its kernel cache (`triton_key`: 0.4 s of sha256 on the H200
machine), the import of its gluon front end (0.13 s), its driver setup, and each kernel then its
load from the cache. A merge pays that off the critical path:
- `start_runtime`, from the command line before torch is imported (Triton does not import it):
  the hash and the import, on a thread, while torch's import runs (sha256 drops the GIL);
- `start`, from the moment the device is known (while the plan is made and the first inputs are
  read): the finite check (the first kernel of every pass) on tiny tensors of the dtypes the
  engine merges, on a thread.
This module imports torch only in `start`."""
import importlib.util
import os
import threading


def start_runtime(device) -> None:
    """Warm the Triton runtime's torch-free part, unless the merge runs on the CPU (device "cpu",
    or None on a machine without the NVIDIA driver) or Triton is not installed."""
    if device == "cpu" or (device is None and not os.path.exists("/dev/nvidiactl")):
        return
    if importlib.util.find_spec("triton") is None:
        return

    def warm() -> None:
        try:
            from triton.runtime.cache import triton_key
            triton_key()  # functools.lru_cache: the launches later find it computed
            import triton.experimental.gluon  # noqa: F401 (the first launch's specialization imports it)
        except Exception:  # noqa: BLE001 (another Triton version: the first launch pays instead)
            pass

    threading.Thread(target=warm, name="neurokern-triton-warmup", daemon=True).start()


def start(device) -> None:
    import torch

    from neurokern.ops import STORAGE_DTYPES
    from neurokern.ops import triton as triton_kernels

    if device.type != "cuda" or not triton_kernels.AVAILABLE:
        return

    def warm() -> None:
        try:
            with torch.cuda.device(device):
                triton_kernels.finite.nonfinite_flags([torch.zeros(16, dtype=d, device=device) for d in STORAGE_DTYPES])
        except Exception:  # noqa: BLE001 (the merge launches the kernel itself and reports what fails)
            pass

    threading.Thread(target=warm, name="neurokern-kernel-warmup", daemon=True).start()
