"""PEP 517 build backend: setuptools, compiled against the torch already installed in the target
environment. pip's isolated build environment would otherwise fetch its own (newest, multi-GB)
torch, and an extension built against a torch other than the one it runs with breaks its ABI."""
import sys
import sysconfig

for _key in ("purelib", "platlib"):
    _path = sysconfig.get_paths()[_key]
    if _path not in sys.path:
        sys.path.append(_path)

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only by a broken install
    raise SystemExit(
        "neurokern builds against the installed torch: install it first "
        "(CPU machines here: pip install torch==2.13.0), then pip install -e ."
    ) from exc

from setuptools.build_meta import *  # noqa: E402,F401,F403
