"""Triton compiles one variant of a kernel per specialization of its arguments: an integer equal to
1 or divisible by 16, a pointer 16-byte aligned. The list kernels (one launch over a table of
tensors) take arguments that depend on how a merge batched its tensors: the table's length `nt`,
program and row counts, and pointers (slices of per-batch buffers, `like*`: a tensor of the batch
passed for its dtype, or standing in for an absent one). Specialized, they made a merge compile
kernels that `neurokern warmup`, which merges one tensor of each shape, had not (on an H100:
tests/engine/test_warmup.py::test_warmup_compiles_once_into_the_cache, 7 kernels against 6). The
tensors themselves are read through the table, whose alignment the kernels' ALIGNED states."""
import importlib
import pkgutil

import neurokern.ops.triton as triton_kernels

BATCH_DEPENDENT = {"nt", "P", "count"}


def _kernels():
    for info in pkgutil.iter_modules(triton_kernels.__path__):
        module = importlib.import_module(f"neurokern.ops.triton.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)  # JITFunction and InterpretedFunction wrap the Python function
            if name.endswith("kernel") and getattr(fn, "__module__", None) == module.__name__:
                yield f"{info.name}.{name}", obj


def _not_specialized(kernel, option: str) -> set:
    """The arguments a kernel's decorator keeps out of `option` (do_not_specialize: integers' values;
    do_not_specialize_on_alignment: pointers' alignment), compiled (JITFunction) or interpreted
    (InterpretedFunction keeps the decorator's keyword arguments)."""
    names = getattr(kernel, option, None)
    if names is None:
        names = (getattr(kernel, "kwargs", None) or {}).get(option) or []
    return {kernel.arg_names[i] if isinstance(i, int) else i for i in names}


def test_list_kernels_do_not_specialize_on_batching():
    list_kernels = {name: k for name, k in _kernels() if "nt" in k.arg_names}
    assert len(list_kernels) >= 11, sorted(list_kernels)
    for name, kernel in list_kernels.items():
        counts = {a for a in kernel.arg_names if a in BATCH_DEPENDENT}
        missing = counts - _not_specialized(kernel, "do_not_specialize")
        assert not missing, f"{name} specializes on the value of {sorted(missing)}"
        pointers = {a for a in kernel.arg_names if a.endswith("_ptr") or a == "flags" or a.startswith("like")}
        missing = pointers - _not_specialized(kernel, "do_not_specialize_on_alignment")
        assert not missing, f"{name} specializes on the alignment of {sorted(missing)}"
