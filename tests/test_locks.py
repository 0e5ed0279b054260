"""Folder locks between processes: a second writer of a store, a training run or a sweep's folder is
refused (or waits) with the holder named; a holder that dies leaves no lock behind."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.settings import locks
from helpers.settings.locks import FolderLock, LockBusy
from helpers.activations.store import META_DTYPE, StoreWriter

HOOK = "blocks.0.hook_resid_post"
HEADER = {"model": "toy", "corpus": "brown", "split": "train", "ctx_len": 9, "seed": 0, "hooks": [HOOK],
          "d_model": 4, "dtype": "float16"}
REPO = Path(__file__).resolve().parent.parent

HOLDER = """
import errno, sys, time
from pathlib import Path
kind, folder, ready, mode = sys.argv[1:5]
if mode == "marker":  # a file system that refuses flock
    import fcntl
    def refuse(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    fcntl.flock = refuse
from helpers.settings.locks import FolderLock
from helpers.activations.store import StoreWriter
HEADER = {header}
if kind == "store":
    w = StoreWriter(folder, HEADER)
    (Path(folder) / "shard_00000.meta.bin.12345-abcdef.tmp").write_bytes(b"half a shard")  # a write under way
else:
    FolderLock(folder, "training").acquire()
Path(ready).write_text("held")
time.sleep(60)
"""


def _hold(tmp_path, kind, folder, mode="flock"):
    """Start a process that takes the lock of `folder` and keeps it (at most 60 s); return it once it holds it."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(HOLDER).format(header=repr(HEADER)))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), kind, str(folder), str(ready), mode], env=env)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, "the holder process failed"
        assert time.monotonic() < deadline, "the holder process did not take the lock in time"
        time.sleep(0.05)
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _flock_refused(monkeypatch):
    import fcntl

    def refuse(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)


def test_a_second_store_writer_is_refused_naming_the_holder_and_a_dead_holder_blocks_nothing(tmp_path):
    folder = tmp_path / "store"
    proc = _hold(tmp_path, "store", folder)
    try:
        with pytest.raises(LockBusy) as err:
            StoreWriter(folder, HEADER)
        message = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()} since " in message
        assert str(locks.lock_path(folder)) in message and "writing the activation store" in message
        assert (folder / "shard_00000.meta.bin.12345-abcdef.tmp").exists(), "the holder's write was deleted"
    finally:
        _kill(proc)
    w = StoreWriter(folder, HEADER)  # killed (no clean-up of its own): its lock went with it
    assert not list(folder.glob("*.tmp"))  # now the folder is ours: the dead writer's leftovers go
    meta = np.zeros(3, dtype=META_DTYPE)
    w.write_shard(meta, {HOOK: torch.ones(3, 4)}, first_context=0, n_contexts=1)
    assert w.finish().n_tokens == 3


def test_a_second_writer_waits_for_the_first_then_goes_on(tmp_path, capsys):
    folder = tmp_path / "store"
    proc = _hold(tmp_path, "store", folder)
    killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1.5); os.kill({proc.pid}, 9)"])
    try:
        w = StoreWriter(folder, HEADER, wait=60)
        w.close()
        out = capsys.readouterr().out
        assert f"waiting: {folder} is locked by pid {proc.pid}" in out and "lock acquired, continuing" in out
    finally:
        killer.wait(timeout=30)
        if proc.poll() is None:
            _kill(proc)
        proc.wait(timeout=30)


def test_a_training_run_folder_is_locked(tmp_path, array_store):
    from conftest import sparse_data
    from helpers.saes.stack import SAEConfig
    from helpers.saes.train import TrainConfig, train_sweep

    x, _ = sparse_data(n=512, d=16)
    store = array_store(x)
    run = tmp_path / "run"
    proc = _hold(tmp_path, "lock", run)
    tc = TrainConfig(total_tokens=128 * 4, batch_size=128, device="cpu")
    try:
        with pytest.raises(LockBusy, match=f"{run} is locked by pid {proc.pid} .*\\(training\\)"):
            train_sweep(store, HOOK, [SAEConfig(16, 32)], tc, run_dir=run, progress=False, wait=0)
    finally:
        _kill(proc)
    assert train_sweep(store, HOOK, [SAEConfig(16, 32)], tc, run_dir=run, progress=False, wait=0).diverged == {}


def test_where_flock_is_refused_a_marker_file_names_the_holder_and_a_dead_one_is_taken_over(tmp_path, monkeypatch):
    _flock_refused(monkeypatch)
    folder = tmp_path / "store"
    proc = _hold(tmp_path, "store", folder, mode="marker")
    marker = locks.marker_path(folder)
    try:
        assert json.loads(marker.read_text())["pid"] == proc.pid
        with pytest.raises(LockBusy) as err:
            StoreWriter(folder, HEADER)
        assert f"pid {proc.pid}" in str(err.value) and f"delete {marker}" in str(err.value)
    finally:
        _kill(proc)
    assert marker.exists()  # a killed process cannot remove its marker ...
    with pytest.warns(UserWarning, match=f"taking over the lock {marker} left by pid {proc.pid}"):
        w = StoreWriter(folder, HEADER)  # ... but one of this host that is gone is taken over
    assert json.loads(marker.read_text())["pid"] == os.getpid()
    w.close()
    assert not marker.exists()


def test_a_marker_left_by_another_machine_says_how_to_clear_it(tmp_path, monkeypatch):
    _flock_refused(monkeypatch)
    folder = tmp_path / "store"
    marker = locks.marker_path(folder)
    marker.write_text(json.dumps({"pid": 4242, "host": "colab-vm-7", "since": "2026-01-01T10:00:00+00:00",
                                  "what": "writing the activation store"}))
    with pytest.raises(LockBusy, match=f"pid 4242 on host colab-vm-7 since 2026-01-01T10:00:00.*delete {marker}"):
        StoreWriter(folder, HEADER)
    marker.unlink()  # as the message says
    StoreWriter(folder, HEADER).close()


def test_a_process_may_take_its_own_lock_again(tmp_path):
    folder = tmp_path / "f"
    with FolderLock(folder, "outer"):
        with FolderLock(folder, "inner"):
            pass
        proc_check = subprocess.run(
            [sys.executable, "-c", "import sys; from helpers.settings.locks import FolderLock, LockBusy\n"
             "try:\n FolderLock(sys.argv[1]).acquire()\nexcept LockBusy:\n sys.exit(3)", str(folder)],
            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
        assert proc_check.returncode == 3, "still held by the outer lock"
    FolderLock(folder, wait=0).acquire().release()


def test_a_sweep_being_trained_elsewhere_is_waited_for_naming_its_holder(tmp_path, monkeypatch):
    from helpers.runs import sweep
    from helpers.settings.profiles import get_profile

    monkeypatch.setenv("SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SAE_LOCK_WAIT", "0.5")
    p = get_profile("test")
    folder = sweep.sweep_dir(p)
    proc = _hold(tmp_path, "lock", folder)
    try:
        with pytest.raises(LockBusy, match=f"{folder} is locked by pid {proc.pid}"):
            sweep.get_sweep(p, model=object(), progress=False)
    finally:
        _kill(proc)
