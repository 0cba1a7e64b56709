"""Files a user (or an attacker) planted in a run directory: never followed, trusted or run.

A resume refuses a run directory holding a symbolic link or a hard-linked file; the run's own
writes replace a planted link instead of writing through it; the client store is its owner's
only; the Ray-process reaper kills no process a file merely names."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import psutil
import pytest

from fedrlhf_ray.client_store import ClientStore
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.experiment import refuse_links, resume_config
from fedrlhf_ray.ray_runtime import reap
from fedrlhf_ray.rundir import append_rows, atomic_write


@pytest.fixture
def outside(tmp_path):
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    return target


def fake_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (run / "checkpoint-000001.npz").write_bytes(b"")
    return run


@pytest.mark.parametrize("where", ["learning_curves.png", "clients/client-000000/round-000001.npz", "config.yaml"])
def test_resume_refuses_a_planted_symlink_before_reading_or_writing(tmp_path, outside, where):
    run = fake_run(tmp_path)
    link = run / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    with pytest.raises(UserError) as info:
        resume_config(run)
    assert str(info.value) == (
        f"--resume {run}: {link} is a symbolic link; a run directory holds neither (remove it, or start the run again)"
    )
    assert outside.read_text() == "precious\n"


def test_resume_refuses_a_hard_linked_file_and_a_linked_run_directory(tmp_path, outside):
    run = fake_run(tmp_path)
    os.link(outside, run / "metrics.jsonl")
    with pytest.raises(UserError, match="metrics.jsonl is a file with another hard link"):
        refuse_links(run)
    linked = tmp_path / "linked-run"
    linked.symlink_to(run)
    with pytest.raises(UserError, match="linked-run is a symbolic link"):
        refuse_links(linked)


def test_resume_checks_the_client_store_outside_the_run_too(tmp_path, outside):
    run = fake_run(tmp_path)
    store = tmp_path / "store" / "run" / "client-000001"
    store.mkdir(parents=True)
    (store / "noise.key").symlink_to(outside)
    refuse_links(run)  # the run directory alone is clean
    with pytest.raises(UserError, match="noise.key is a symbolic link"):
        refuse_links(run, str(tmp_path / "store"))


def test_the_cli_refuses_it_in_one_line_with_exit_2(tmp_path, outside):
    run = fake_run(tmp_path)
    (run / "status.json").symlink_to(outside)
    proc = subprocess.run([sys.executable, "-m", "fedrlhf_ray.cli", "run", "--resume", str(run)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "status.json is a symbolic link" in proc.stderr
    assert outside.read_text() == "precious\n"


def test_writes_replace_a_planted_link_instead_of_following_it(tmp_path, outside):
    link = tmp_path / "summary.json"
    link.symlink_to(outside)
    atomic_write(link, b"{}")
    assert not link.is_symlink() and link.read_bytes() == b"{}" and outside.read_text() == "precious\n"
    rows = tmp_path / "metrics.jsonl"
    rows.symlink_to(outside)
    with pytest.raises(UserError, match="symbolic link"):
        append_rows(rows, [{"round": 1}])
    assert outside.read_text() == "precious\n"


def test_client_records_and_noise_keys_are_their_owners_only(tmp_path):
    store = ClientStore(tmp_path / "clients")
    store.save(3, 1, {"w": np.zeros(2)}, keep_from=0)
    store.noise_secret(3)
    folder = tmp_path / "clients" / "client-000003"
    assert stat.S_IMODE((tmp_path / "clients").stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("round-000001.npz", "noise.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    store.save(3, 2, {"w": np.ones(2)}, keep_from=2)  # a recycled file stays private too
    store.save(3, 3, {"w": np.ones(2)}, keep_from=3)
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.glob("round-*.npz")} == {0o600}


def test_the_reaper_kills_no_process_a_planted_file_names():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(sleeper.pid).create_time()
        planted = {
            "owner": {"pid": 4_000_000, "started": 0.0},
            "session": "session_2026-01-01_00-00-00_000000_1",
            "processes": [{"pid": sleeper.pid, "started": started}, {"pid": os.getpid(), "started": 0}],
        }
        assert reap(planted, "run") == 0
        assert reap({**planted, "session": "../../etc"}, "run") == 0
        assert reap({"processes": "everything"}, "run") == reap(["x"], "run") == 0  # type: ignore[arg-type]
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


class _Planted:
    """Unpickling this runs code: it would write the file it names."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_planted_tuner_pickle_is_never_loaded(tmp_path):
    import pickle

    from fedrlhf_ray.sweeps.schema import SWEEP_FILE

    from conftest import write_sweep

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    write_sweep(sweep_dir / SWEEP_FILE)
    ran = tmp_path / "ran"
    (sweep_dir / "tuner.pkl").write_bytes(pickle.dumps(_Planted(str(ran))))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = subprocess.run([sys.executable, "-m", "fedrlhf_ray.cli", "tune", "--resume", str(sweep_dir)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "carries no seal" in proc.stderr
    assert not ran.exists()


def test_the_seal_catches_a_changed_added_or_linked_file(tmp_path, monkeypatch, outside):
    from fedrlhf_ray.sweeps.seal import SEAL, check_seal, key_file, seal

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "trial_0").mkdir(parents=True)
    (sweep_dir / "tuner.pkl").write_bytes(b"tune's state")
    (sweep_dir / "trial_0" / "params.pkl").write_bytes(b"a trial's")
    seal(sweep_dir)
    check_seal(sweep_dir)  # as the sweep left it
    assert stat.S_IMODE(key_file().stat().st_mode) == 0o600
    (sweep_dir / "tuner.pkl").write_bytes(b"tune's statf")
    with pytest.raises(UserError, match="its seal does not match"):
        check_seal(sweep_dir)
    (sweep_dir / "tuner.pkl").write_bytes(b"tune's state")
    (sweep_dir / "searcher-state.pkl").write_bytes(b"planted")
    with pytest.raises(UserError, match="its seal does not match"):
        check_seal(sweep_dir)
    (sweep_dir / "searcher-state.pkl").unlink()
    (sweep_dir / "trial_0" / "result.json").symlink_to(outside)
    with pytest.raises(UserError, match="is a link"):
        check_seal(sweep_dir)
    (sweep_dir / "trial_0" / "result.json").unlink()
    check_seal(sweep_dir)
    (sweep_dir / SEAL).write_text("0" * 64)  # a forged seal needs the user's key
    with pytest.raises(UserError, match="its seal does not match"):
        check_seal(sweep_dir)
