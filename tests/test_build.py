"""The built extension raises its C++ errors through the process's one C++ runtime: it imports the
unwinder and the exception machinery (libgcc_s, libstdc++) instead of carrying copies of its own.
A copy linked in (a compiler configured to link libgcc or libstdc++ statically) meets torch's in
the same unwind, and a failed argument check then crashes the process instead of raising: what
the bad-argument tests of tests/ops saw on one GPU machine's build (its compiler's library folder
held libstdc++.a only); elsewhere the copy's streams lost the numbers of the messages. setup.py
links with -shared-libgcc and -l:libstdc++.so.6; this checks the library that was actually built,
wherever the tests run."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import neurokern.ops  # noqa: F401 (loads neurokern._C)

RUNTIME = ("_Unwind_RaiseException", "_Unwind_Resume", "__cxa_throw", "__gxx_personality_v0")


def _library() -> Path:
    import neurokern

    found = sorted(Path(neurokern.__file__).parent.glob("_C*.so"))
    assert found, "neurokern._C is not built"
    return found[0]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_the_extension_imports_the_cpp_runtime():
    out = subprocess.run(["nm", "-D", str(_library())], capture_output=True, text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            symbols[parts[-1].split("@")[0]] = parts[-2]
    defined = [name for name in RUNTIME if symbols.get(name, "U") != "U"]
    assert not defined, f"{_library().name} defines {defined}: a copy of the C++ runtime linked in"
    assert symbols.get("__cxa_throw") == "U"  # the ops throw (TORCH_CHECK), through the shared runtime


def test_a_failed_check_raises():
    with pytest.raises(RuntimeError, match=r"density must be in \(0, 1\], got 1\.5(\s|$)"):
        torch.ops.neurokern.dare.default(torch.zeros(3), [torch.zeros(3)], [1.0], 1.5, [1], "density", "none",
                                         "none", 1.0)
