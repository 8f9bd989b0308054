"""The accuracy suite is tooling outside the installed package (bench/accuracy/, imported as
bench.accuracy): its tests import it from the repository root, whatever directory pytest was
started from."""
import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
