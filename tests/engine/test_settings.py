"""EngineSettings.from_env: every NEUROKERN_* variable a merge reads, its default when unset or
empty, and one clear error naming the variable for a bad value."""
import pytest

from neurokern.engine.settings import EngineSettings
from neurokern.errors import NeurokernError


def test_defaults_of_an_empty_environment():
    assert EngineSettings.from_env({}) == EngineSettings()
    assert EngineSettings.from_env({"NEUROKERN_READ_THREADS": "", "NEUROKERN_PROFILE": ""}) == EngineSettings()
    s = EngineSettings()
    assert (s.read_threads, s.read_piece_bytes, s.adapter_piece_bytes, s.max_unit_bytes) == (16, 16 * 2**20,
                                                                                               4 * 2**20, 512 * 2**20)
    assert (s.prefetch, s.dist_backend, s.dist_timeout_s, s.profile, s.trace) == (True, None, 7200.0, False, "")


def test_every_variable_is_read():
    env = {"NEUROKERN_READ_THREADS": "3", "NEUROKERN_READ_PIECE_BYTES": "1000", "NEUROKERN_ADAPTER_PIECE_BYTES": "1",
           "NEUROKERN_MAX_UNIT_BYTES": "20000", "NEUROKERN_PREFETCH": "0", "NEUROKERN_DIST_BACKEND": "gloo",
           "NEUROKERN_DIST_TIMEOUT": "1.5", "NEUROKERN_PROFILE": "1", "NEUROKERN_TRACE": "/tmp/t.json"}
    assert EngineSettings.from_env(env) == EngineSettings(
        read_threads=3, read_piece_bytes=1000, adapter_piece_bytes=1, max_unit_bytes=20000, prefetch=False,
        dist_backend="gloo", dist_timeout_s=1.5, profile=True, trace="/tmp/t.json")
    for on in ("1", "true", "YES", "on"):
        assert EngineSettings.from_env({"NEUROKERN_PROFILE": on}).profile
    for off in ("0", "false", "No", "off"):
        assert not EngineSettings.from_env({"NEUROKERN_PREFETCH": off}).prefetch


@pytest.mark.parametrize("variable,value,expected", [
    ("NEUROKERN_READ_THREADS", "0", "NEUROKERN_READ_THREADS='0': expected a whole number above 0"),
    ("NEUROKERN_READ_PIECE_BYTES", "16MiB", "NEUROKERN_READ_PIECE_BYTES='16MiB': expected a whole number above 0"),
    ("NEUROKERN_ADAPTER_PIECE_BYTES", "-4", "NEUROKERN_ADAPTER_PIECE_BYTES='-4': expected a whole number above 0"),
    ("NEUROKERN_MAX_UNIT_BYTES", "1.5", "NEUROKERN_MAX_UNIT_BYTES='1.5': expected a whole number above 0"),
    ("NEUROKERN_PREFETCH", "maybe", "NEUROKERN_PREFETCH='maybe': expected 1 (on) or 0 (off)"),
    ("NEUROKERN_PROFILE", "2", "NEUROKERN_PROFILE='2': expected 1 (on) or 0 (off)"),
    ("NEUROKERN_DIST_BACKEND", "mpi", "NEUROKERN_DIST_BACKEND='mpi': expected 'gloo', or 'nccl' with --device cuda"),
    ("NEUROKERN_DIST_TIMEOUT", "0", "NEUROKERN_DIST_TIMEOUT='0': expected a number of seconds above 0"),
    ("NEUROKERN_DIST_TIMEOUT", "soon", "NEUROKERN_DIST_TIMEOUT='soon': expected a number of seconds above 0"),
    ("NEUROKERN_DIST_TIMEOUT", "nan", "NEUROKERN_DIST_TIMEOUT='nan': expected a number of seconds above 0"),
])
def test_a_bad_value_names_the_variable(variable, value, expected):
    with pytest.raises(NeurokernError) as exc:
        EngineSettings.from_env({variable: value})
    assert str(exc.value).startswith(expected), str(exc.value)


def test_fields_are_checked_and_frozen():
    with pytest.raises(NeurokernError, match=r"max_unit_bytes \(NEUROKERN_MAX_UNIT_BYTES\) = 0"):
        EngineSettings(max_unit_bytes=0)
    with pytest.raises(NeurokernError, match="NEUROKERN_DIST_BACKEND='mpi'"):
        EngineSettings(dist_backend="mpi")
    with pytest.raises(AttributeError):
        EngineSettings().read_threads = 2


def test_no_module_reads_the_environment_at_import():
    """Every NEUROKERN_* variable is read by EngineSettings.from_env (through a name), none directly."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "neurokern"
    readers = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if re.search(r"environ\.get\(\s*[\"']NEUROKERN_|environ\[[\"']NEUROKERN_|getenv\(\s*[\"']NEUROKERN_",
                            p.read_text())]
    assert readers == [], readers


def test_the_library_holds_no_test_hook():
    """Faults (a kill or a stall at a chosen event) come from the tests (tests/faults.py wraps the
    engine's functions): no library module reads a test variable or checks for one."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "neurokern"
    hooks = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if any(word in p.read_text() for word in ("NEUROKERN_TEST_", "test_crash", "test_stall", "fault_point"))]
    assert hooks == [], hooks
