"""The compiled-step cache: entries are whole or absent, damaged ones are rebuilt with a note, keys change with what
changes a compile, and processes storing one entry at once both end with a whole one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kangaroo_fast import step_cache
from kangaroo_fast.step_cache import StepCache

ROOT = Path(__file__).resolve().parents[1]


def write_bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def test_an_entry_round_trips(tmp_path):
    cache = StepCache(tmp_path)
    assert cache.load("k", "verify", Path.read_bytes) is None
    path = cache.store("k", "verify", write_bytes(b"compiled" * 100))
    assert cache.load("k", "verify", Path.read_bytes) == b"compiled" * 100
    assert cache.path("k", "verify") == path and path.parent == tmp_path / "k"
    assert [p.name for p in (tmp_path / "k").iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_a_damaged_entry_is_rebuilt_with_a_note(tmp_path, capsys, damage):
    cache = StepCache(tmp_path)
    path = cache.store("k", "draft", write_bytes(bytes(range(256)) * 64))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[500] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:
        (tmp_path / "k" / "draft.json").write_text("{not json")
    assert cache.load("k", "draft", Path.read_bytes) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "draft" in err and "building it again" in err
    assert not (tmp_path / "k" / "draft.json").exists()  # removed: the next store starts clean
    cache.store("k", "draft", write_bytes(b"again"))
    assert cache.load("k", "draft", Path.read_bytes) == b"again"


def test_a_loader_that_refuses_the_file_is_a_rebuild_not_a_crash(tmp_path, capsys):
    cache = StepCache(tmp_path)
    cache.store("k", "head", write_bytes(b"whole, but not a package"))

    def refuse(path):
        raise RuntimeError("PytorchStreamReader failed reading zip archive")

    assert cache.load("k", "head", refuse) is None
    assert "PytorchStreamReader" in capsys.readouterr().err
    assert cache.load("k", "head", Path.read_bytes) is None  # gone, not loaded by the next reader either


def test_a_failed_write_leaves_no_entry(tmp_path):
    cache = StepCache(tmp_path)

    def fail(path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.store("k", "deep", fail)
    assert cache.load("k", "deep", Path.read_bytes) is None
    assert list((tmp_path / "k").iterdir()) == []


def test_keys_follow_what_changes_a_compile():
    base = {"kind": "verify", "model": step_cache.tensor_digest([torch.ones(3)]), "dtype": "bfloat16"}
    assert step_cache.key_of(base) == step_cache.key_of(dict(reversed(list(base.items()))))
    assert step_cache.key_of({**base, "dtype": "float32"}) != step_cache.key_of(base)
    assert step_cache.key_of({**base, "model": step_cache.tensor_digest([torch.ones(3) * 2])}) != \
        step_cache.key_of(base)
    assert step_cache.tensor_digest([torch.ones(3)]) != step_cache.tensor_digest([torch.ones(3, dtype=torch.float64)])
    assert step_cache.tensor_digest([torch.ones(2, 3)]) != step_cache.tensor_digest([torch.ones(3, 2)])
    assert step_cache.tensor_digest([None, torch.ones(1)]) != step_cache.tensor_digest([torch.ones(1), None])
    env = step_cache.environment()
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert len(env["code"]) == 32 and set(env["cpu"]) <= set(step_cache.ISA_FLAGS)


WRITER = """
import sys, time
from pathlib import Path
from kangaroo_fast.step_cache import StepCache
cache, me = StepCache(sys.argv[1]), sys.argv[2]
def write(path):
    with open(path, "wb") as f:
        for _ in range(64):  # slow enough that the two writers overlap
            f.write(me.encode() * 4096)
            f.flush()
            time.sleep(0.005)
cache.store("k", "verify", write)
print(cache.load("k", "verify", Path.read_bytes)[:1].decode())
"""


def test_two_processes_storing_one_entry_both_end_with_a_whole_one(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), me], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for me in "ab"]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _out, err in outs]
    assert all(out.strip() in ("a", "b") for out, _err in outs)
    data = StepCache(tmp_path).load("k", "verify", Path.read_bytes)
    assert data in (b"a" * 4096 * 64, b"b" * 4096 * 64)
    meta = json.loads((tmp_path / "k" / "verify.json").read_text())
    assert meta["size"] == len(data)
