"""The Triton runtime's warm-up before torch is imported (kernel_warmup.start_runtime)."""
import subprocess
import sys
import threading

import pytest

pytest.importorskip("triton")


def _warmup_threads():
    return [t for t in threading.enumerate() if t.name == "neurokern-triton-warmup"]


def test_start_runtime_computes_the_cache_key_on_a_thread():
    from triton.runtime.cache import triton_key

    from neurokern.engine import kernel_warmup
    triton_key.cache_clear()
    kernel_warmup.start_runtime("cuda")
    threads = _warmup_threads()
    assert len(threads) == 1
    threads[0].join(timeout=120)
    assert not threads[0].is_alive() and triton_key.cache_info().currsize == 1


def test_start_runtime_does_nothing_for_the_cpu():
    from neurokern.engine import kernel_warmup
    kernel_warmup.start_runtime("cpu")
    assert _warmup_threads() == []


def test_the_module_and_the_warm_up_import_no_torch():
    code = ("import sys\nfrom neurokern.engine import kernel_warmup\nkernel_warmup.start_runtime('cuda')\n"
            "[t.join() for t in __import__('threading').enumerate() if t.name == 'neurokern-triton-warmup']\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
