"""Path rules for the files a merge reads (README, "Guarantees"): an index names files inside its
model folder (no `..`, no absolute path); a file that is a symbolic link must resolve inside the
folder, or, in a Hugging Face cache snapshot, inside the repository's blobs/; every file read is a
regular file, checked before anything opens it (a FIFO would block the merge forever). Each
refusal is one line and exit 2."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from neurokern.cli import main

from engine_helpers import make_models, read_dir, write_config

INDEX = "model.safetensors.index.json"


@pytest.fixture
def inputs(tmp_path):
    root = make_models(tmp_path / "models")
    return root, write_config(tmp_path / "c.yaml", "ties", root, None, {"density": 0.3})


def fails(capsys, cfg, out) -> str:
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neurokern: error: ") and err.count("\n") == 1, err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return err


def set_index_entry(folder, value):
    """Point the first tensor of the folder's index at `value`; returns that tensor's name."""
    index = json.loads((folder / INDEX).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = value
    (folder / INDEX).write_text(json.dumps(index))
    return name


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_index_entry_out_of_the_model_folder_is_refused(inputs, tmp_path, capsys, where):
    """The file an escaping entry names is a valid shard with the right tensors: the old reader
    merged it (exit 0)."""
    root, cfg = inputs
    folder = root / "task_1"
    index = json.loads((folder / INDEX).read_text())
    first = index["weight_map"][next(iter(index["weight_map"]))]
    (tmp_path / "elsewhere").mkdir()
    shutil.move(folder / first, tmp_path / "elsewhere" / "evil.safetensors")
    value = "../../elsewhere/evil.safetensors" if where == "relative" else str(tmp_path / "elsewhere" / "evil.safetensors")
    index["weight_map"] = {n: (value if f == first else f) for n, f in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    err = fails(capsys, cfg, tmp_path / "out")
    assert f"{folder / INDEX}: weight_map[" in err and f"is {value!r}, a path out of the model folder" in err, err


@pytest.mark.parametrize("value,described", [(5, "5 (a number)"), (["a.safetensors"], '["a.safetensors"] (a list)'),
                                             (None, "null (null)"), ("", '"" (a string)')])
def test_index_entry_that_is_no_file_name(inputs, tmp_path, capsys, value, described):
    root, cfg = inputs
    name = set_index_entry(root / "task_1", value)
    err = fails(capsys, cfg, tmp_path / "out")
    assert f"{root / 'task_1' / INDEX}: weight_map[{name!r}] is {described}; expected a file name" in err, err


def test_index_that_is_no_object(inputs, tmp_path, capsys):
    root, cfg = inputs
    (root / "task_1" / INDEX).write_text(json.dumps({"weight_map": ["model-00001-of-00003.safetensors"]}))
    assert "weight_map is [" in fails(capsys, cfg, tmp_path / "out")


def test_symlink_out_of_the_model_folder_is_refused(inputs, tmp_path, capsys):
    root, cfg = inputs
    shard = root / "task_0" / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    err = fails(capsys, cfg, tmp_path / "out")
    assert f"{shard} resolves to {outside}, outside the model folder {root / 'task_0'}" in err, err


def test_side_file_linking_out_of_the_folder_is_refused(inputs, tmp_path, capsys):
    """config.json and tokenizer files are copied into the output: a link to elsewhere would copy
    that file into it (the old code did)."""
    root, cfg = inputs
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    (root / "base" / "tokenizer_config.json").unlink()
    (root / "base" / "tokenizer_config.json").symlink_to(secret)
    err = fails(capsys, cfg, tmp_path / "out")
    assert f"{root / 'base' / 'tokenizer_config.json'} resolves to {secret}, outside the model folder" in err, err


def test_links_inside_the_folder_and_into_a_hub_cache_blob_store_are_read(inputs, tmp_path):
    """The layout huggingface_hub makes: REPO/snapshots/REV/<file> -> ../../blobs/<hash>. Also a
    link to another file of the same folder. Both merge, to the same bytes as plain files."""
    root, cfg = inputs
    assert main(["merge", str(cfg), str(tmp_path / "ref"), "--device", "cpu", "--quiet"]) == 0
    repo = tmp_path / "hub" / "models--org--task_1"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, file in enumerate(sorted((root / "task_1").iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    inside = root / "task_0" / "weights" / "real.safetensors"
    inside.parent.mkdir()
    shutil.move(root / "task_0" / "model.safetensors", inside)
    (root / "task_0" / "model.safetensors").symlink_to(inside)
    cfg.write_text(cfg.read_text().replace(str(root / "task_1"), str(snapshot)))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
    got, ref = read_dir(tmp_path / "out"), read_dir(tmp_path / "ref")
    assert got.pop("neurokern_manifest.json") != ref.pop("neurokern_manifest.json")  # other paths in the config
    got.pop("neurokern_config.yml"), ref.pop("neurokern_config.yml")
    assert got == ref


def run_cli(*args, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUROKERN_TEST")}
    return subprocess.run([sys.executable, "-m", "neurokern", "merge", *map(str, args), "--device", "cpu", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_fifo_as_a_shard_is_refused_before_any_read(inputs, tmp_path):
    """The old command line hung forever in its warm-up read of the FIFO (this test timed out)."""
    root, cfg = inputs
    shard = root / "task_2" / "model-00002-of-00003.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    done = run_cli(cfg, tmp_path / "out")
    assert done.returncode == 2 and done.stderr == f"neurokern: error: {shard} is a FIFO (named pipe), not a regular file\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_fifo_as_the_config_or_the_model_path(inputs, tmp_path):
    root, cfg = inputs
    os.mkfifo(tmp_path / "fifo.yaml")
    done = run_cli(tmp_path / "fifo.yaml", tmp_path / "out")
    assert (done.returncode, done.stderr) == (2, f"neurokern: error: config {tmp_path / 'fifo.yaml'} is a FIFO (named "
                                                 "pipe), not a regular file\n")
    os.mkfifo(tmp_path / "model.safetensors")
    cfg.write_text(cfg.read_text().replace(str(root / "task_0"), str(tmp_path / "model.safetensors")))
    done = run_cli(cfg, tmp_path / "out")
    assert done.returncode == 2 and f"model path {tmp_path / 'model.safetensors'} is a FIFO (named pipe)" in done.stderr


def test_folder_in_place_of_a_shard(inputs, tmp_path, capsys):
    root, cfg = inputs
    shard = root / "task_2" / "model-00003-of-00003.safetensors"
    shard.unlink()
    shard.mkdir()
    assert f"{shard} is a folder, not a regular file" in fails(capsys, cfg, tmp_path / "out")
