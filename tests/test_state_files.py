"""State files without pickle (state_codec), the run directory's atomic writes, the client store.

Pure tests: no Ray.
"""

from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest
import torch

from fedrlhf_ray import rundir as rundir_module
from fedrlhf_ray.client_store import ClientStore
from fedrlhf_ray.rundir import RunDir, StorageError, append_rows, atomic_write, read_jsonl
from fedrlhf_ray.state_codec import StateFileError, dumps, loads


def test_round_trip_of_the_kinds_a_record_holds():
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = torch.optim.Adam(params)
    params[0].grad = torch.full((3,), 0.5)
    opt.step()
    tree = {
        "rng": np.random.default_rng(7).bit_generator.state,  # 128-bit integers
        "torch_rng": torch.Generator().manual_seed(3).get_state(),
        "optimizer": opt.state_dict(),  # integer keys, tensors, tuples (betas)
        "arrays": [np.arange(5, dtype=np.int32), np.float32(2.5), np.zeros((0, 3))],
        "scalars": {"nan": float("nan"), "none": None, "flag": True, "text": "x"},
        "tuple": (1, (2, "b")),
    }
    back = loads(dumps(tree))
    assert back["rng"] == tree["rng"]
    assert torch.equal(back["torch_rng"], tree["torch_rng"])
    assert set(back["optimizer"]["state"]) == {0} and isinstance(back["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))])
    fresh.load_state_dict(back["optimizer"])  # loads as torch would from its own state
    np.testing.assert_array_equal(back["arrays"][0], tree["arrays"][0])
    assert back["arrays"][1] == np.float32(2.5) and back["arrays"][2].shape == (0, 3)
    assert np.isnan(back["scalars"]["nan"]) and back["scalars"]["none"] is None and back["tuple"] == (1, (2, "b"))


def test_objects_that_would_need_pickle_are_refused():
    with pytest.raises(TypeError, match="without pickle"):
        dumps({"x": object()})
    with pytest.raises(TypeError, match="without pickle"):
        dumps({"x": np.array([object()], dtype=object)})


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/should-never-exist-fedrlhf",))


@pytest.mark.parametrize("data", [
    pickle.dumps(Exploit()), b"", b"PK\x03\x04 truncated", dumps({"a": np.ones(100)})[:300],
])
def test_damaged_or_pickled_files_are_state_file_errors(data):
    with pytest.raises(StateFileError):
        loads(data)
    assert not os.path.exists("/tmp/should-never-exist-fedrlhf")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint-000001.npz"
    monkeypatch.setattr(rundir_module.os, "fsync", _no_space)
    with pytest.raises(StorageError, match=f"could not write {target}: No space left on device"):
        atomic_write(target, b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_the_old_file_when_it_fails(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    atomic_write(target, b"old")
    monkeypatch.setattr(rundir_module.os, "fsync", _no_space)
    with pytest.raises(StorageError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_atomic_write_recycling_an_obsolete_file(tmp_path, monkeypatch):
    old, target = tmp_path / "round-000001.npz", tmp_path / "round-000004.npz"
    old.write_bytes(b"a much longer obsolete record")
    inode = old.stat().st_ino
    atomic_write(target, b"short", durable=False, recycle=old)
    # The old file's inode holds exactly the new bytes (cut to length), under the new name only.
    assert target.read_bytes() == b"short" and target.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    atomic_write(tmp_path / "round-000005.npz", b"new", durable=False, recycle=tmp_path / "gone.npz")
    assert (tmp_path / "round-000005.npz").read_bytes() == b"new"
    # A write that fails after taking over the obsolete file leaves neither it nor a temporary.
    stale = tmp_path / "round-000004.npz"
    monkeypatch.setattr(rundir_module.os, "ftruncate", _no_space)
    with pytest.raises(StorageError, match="No space left on device"):
        atomic_write(tmp_path / "round-000006.npz", b"x" * 100, durable=False, recycle=stale)
    assert [p.name for p in tmp_path.iterdir()] == ["round-000005.npz"]


def test_append_rows_on_a_full_disk_restores_the_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_rows(path, [{"round": 0}])
    before = path.read_bytes()
    monkeypatch.setattr(rundir_module.os, "fsync", _no_space)
    with pytest.raises(StorageError):
        append_rows(path, [{"round": 1, "x": 1.0}])
    assert path.read_bytes() == before
    fresh = tmp_path / "client_metrics.jsonl"
    with pytest.raises(StorageError):
        append_rows(fresh, [{"round": 1}])
    assert not fresh.exists()  # no zero-byte file


def test_a_torn_last_line_is_not_a_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"rou')
    assert read_jsonl(path) == [{"round": 0}, {"round": 1}]


def test_run_dir_keeps_the_last_two_checkpoints(tmp_path):
    rd = RunDir(tmp_path)
    for r in range(1, 5):
        rd.save_checkpoint(r, {"round": r, "global_weights": {"w": np.full(3, r)}, "strategy": {}})
    assert rd.checkpoint_rounds() == [4, 3]
    assert rd.oldest_kept_checkpoint() == 3
    assert rd.load_checkpoint(4)["global_weights"]["w"].tolist() == [4, 4, 4]
    rd.checkpoint_path(4).write_bytes(rd.checkpoint_path(3).read_bytes())  # round 3's state under round 4's name
    with pytest.raises(StateFileError, match="not a checkpoint of this round"):
        rd.load_checkpoint(4)


def test_client_store_versions_and_pruning(tmp_path):
    store = ClientStore(tmp_path)
    for r, keep_from in [(1, 0), (2, 0), (3, 1), (5, 2), (6, 3)]:
        store.save(7, r, {"r": np.array(r)}, keep_from=keep_from)
    # The latest record at or before keep_from=3 (round 3) and all newer ones stay.
    assert store.versions(7) == [6, 5, 3]
    assert store.load(7, upto=4)["r"] == 3
    assert store.load(7, upto=6)["r"] == 6
    assert store.load(8, upto=6) is None
    (tmp_path / "client-000007" / "round-000006.npz").write_bytes(b"garbage")
    with pytest.raises(StateFileError, match="round-000006.npz"):
        store.load(7, upto=6)
