"""What a benchmark ran on and what it took, shared by the bench scripts (imported as bench.machine,
with the repository root on the path): the device tag of a results file's name, and the process's
peak memory. torch is imported only when called."""


def device_tag(device) -> str:
    """"cpu", or the GPU's name in lower case without "NVIDIA " and with dashes for spaces
    ("h100-80gb-hbm3"): the device part of a results file's name."""
    if device.type != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(device).lower().replace("nvidia ", "").replace(" ", "-")


def peak_memory() -> dict:
    """This process's peaks so far: host RSS (VmHWM, bytes) and, once CUDA is in use, torch's
    reserved and allocated GPU memory (bytes; 0 otherwise)."""
    import torch

    hwm = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"peak_rss": hwm,
            "peak_gpu_reserved": torch.cuda.max_memory_reserved() if cuda else 0,
            "peak_gpu_allocated": torch.cuda.max_memory_allocated() if cuda else 0}
