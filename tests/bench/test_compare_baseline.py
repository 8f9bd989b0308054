"""bench/compare_baseline.sh on two stand-in trees (builds skipped): the command runs in each tree
with that tree on PYTHONPATH, alternated, this tree first, each round's log and --out apart."""
import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """import os, sys
import probe_tree
with open(os.environ["ORDER_FILE"], "a") as f:
    f.write(f"{probe_tree.NAME} {os.getcwd()} {' '.join(sys.argv[1:])}\\n")
print("ran", probe_tree.NAME)
"""


def tree(folder: Path, name: str) -> Path:
    (folder / "bench").mkdir(parents=True)
    (folder / "setup.py").write_text("")
    (folder / "probe_tree.py").write_text(f"NAME = {name!r}\n")  # importable only through PYTHONPATH=tree
    (folder / "bench" / "probe.py").write_text(PROBE)
    return folder


def test_alternates_the_two_trees(tmp_path):
    head = tree(tmp_path / "head", "head")
    old = tree(tmp_path / "old", "old")
    archive = tmp_path / "rev123.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in old.rglob("*"):
            tar.add(path, arcname=str(path.relative_to(old)))
    out, order = tmp_path / "out", tmp_path / "order.txt"
    unpacked = tmp_path / "unpacked"
    env = dict(os.environ, OUT=str(out), BUILD="0", APPEND_OUT="1", ORDER_FILE=str(order),
               BASELINE_DIR=str(unpacked))
    env.pop("PYTHONPATH", None)
    run = subprocess.run(["bash", str(ROOT / "bench" / "compare_baseline.sh"), str(archive), "bench/probe.py --x 1", "2"],
                         cwd=head, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line.split() for line in order.read_text().splitlines()]
    assert [line[0] for line in lines] == ["head", "old", "head", "old"]
    assert [line[1] for line in lines] == [str(head), str(unpacked), str(head), str(unpacked)]
    assert [line[2:] for line in lines] == [["--x", "1", "--out", str(out / f"{t}-{r}")]
                                            for r in (1, 2) for t in ("head", "rev123")]
    for t in ("head", "rev123"):
        for r in (1, 2):
            assert (out / f"{t}-{r}.log").read_text().strip().endswith("ran " + ("head" if t == "head" else "old"))
    assert run.stdout.count("exit 0") == 4
