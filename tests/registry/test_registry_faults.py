"""Faults: a writer killed with SIGKILL mid-transaction leaves a consistent database and no partial
rows; a copy killed at any point never leaves a half-written object under its final name, and
adding again works."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from secateur.registry import Registry
from secateur.registry import store

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")

MB = 1 << 20


def checkpoint(root: Path, name: str, shards: int = 1, size: int = 8) -> Path:
    """A model directory with ``shards`` safetensors files of ``size`` bytes of weights each."""
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for s in range(shards):
        header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(path / f"model-{s:05d}.safetensors", "wb") as fh:
            fh.write(struct.pack("<Q", len(header)) + header)
            block = hashlib.sha256(f"{name}{s}".encode()).digest() * (MB // 32)
            for start in range(0, size, MB):
                fh.write(block[: min(MB, size - start)])
    return path


def child(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter (argv: args) and wait for it to end."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=120)


def whole(objects: Path) -> list[str]:
    """Every object under a final name, checked: its files hash to its key (complete, unmodified)."""
    keys = store.stored_keys(objects)
    for key in keys:
        files = {p.relative_to(objects / key).as_posix(): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                                            "bytes": p.stat().st_size}
                 for p in (objects / key).rglob("*") if p.is_file()}
        assert store.manifest_key(files) == key, f"object {key} is incomplete or modified"
    return keys


# --- the database -------------------------------------------------------------------------------

KILL_IN_A_BATCH = """
    import os, signal, sys
    from secateur.registry import Registry
    from secateur.registry.registry import Registry as R

    real, count = R._insert_evaluation, [0]
    def insert(self, *a):
        count[0] += 1
        if count[0] == 50:  # half-way through one transaction of 100 rows
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *a)
    R._insert_evaluation = insert
    reg = Registry(sys.argv[1])
    reg.record_evaluations(sys.argv[2], [{"task": "sts", "metric": "spearman", "value": i} for i in range(100)])
"""

KILL_IN_AN_ADD = """
    import os, signal, sys
    from secateur.registry import Registry
    from secateur.registry.registry import Registry as R

    def link(self, *a):  # the object is in the store and the variant row written, the edge not yet
        os.kill(os.getpid(), signal.SIGKILL)
    R._link = link
    Registry(sys.argv[1]).add(sys.argv[2], "fam", "killed")
"""

LOOP_OF_BATCHES = """
    import sys
    from secateur.registry import Registry
    reg = Registry(sys.argv[1])
    batch = [{"task": "sts", "metric": "spearman", "value": i} for i in range(10)]
    reg.record_evaluations(sys.argv[2], batch)
    print("ready", flush=True)  # one batch committed
    while True:
        reg.record_evaluations(sys.argv[2], batch)
"""


def test_a_writer_killed_mid_transaction_leaves_no_partial_rows(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with Registry(home) as reg:
        v = reg.add(checkpoint(tmp_path, "a"), "fam", "a")
        reg.record_evaluations(v.id, [{"task": "sts", "metric": "spearman", "value": 0.1}] * 3)

    proc = child(KILL_IN_A_BATCH, str(home), v.id)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    proc = child(KILL_IN_AN_ADD, str(home), str(checkpoint(tmp_path, "b")))
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    with Registry(home) as reg:
        assert reg.integrity() == "ok"
        counts = reg.counts()
        assert counts["evaluations"] == 3 and counts["variants"] == 1 and counts["edges"] == 0  # nothing partial
        keys = whole(home / "objects")
        assert len(keys) == 2  # the killed add's object is complete, and referenced by nothing
        assert reg.gc().removed == [k for k in keys if k != v.store_key]
        again = reg.add(tmp_path / "b", "fam", "b")  # adding again works
        assert whole(home / "objects") == sorted([v.store_key, again.store_key])


def test_writers_killed_at_random_moments_leave_only_whole_transactions(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with Registry(home) as reg:
        v = reg.add(checkpoint(tmp_path, "a"), "fam", "a")
    for delay in (0.05, 0.2, 0.35):
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOOP_OF_BATCHES), str(home), v.id],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    with Registry(home) as reg:
        assert reg.integrity() == "ok"
        count = reg.counts()["evaluations"]
        assert count >= 30 and count % 10 == 0  # every transaction of 10 rows is there whole or not at all


# --- the store ----------------------------------------------------------------------------------

KILLED_ADD = """
    import os, signal, sys, time
    from secateur.registry import Registry, store
    from secateur.registry.registry import Registry as R

    point = sys.argv[3]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "copy":  # the second file half written
        real, calls = store._copy_file, [0]
        def copy(src, dst):
            calls[0] += 1
            if calls[0] == 2:
                with open(src, "rb") as fin, open(dst, "wb") as fout:
                    fout.write(fin.read(os.path.getsize(src) // 2))
                    fout.flush()
                die()
            return real(src, dst)
        store._copy_file = copy
    elif point == "install":  # copied and checked, not yet renamed
        store.install = die
    elif point == "commit":  # renamed into place, the transaction not committed
        R._link = die
    elif point == "slow":  # killed from outside while copying
        real = store._copy_file
        def copy(src, dst):
            print("copying", flush=True)
            time.sleep(0.2)
            return real(src, dst)
        store._copy_file = copy
    Registry(sys.argv[1]).add(sys.argv[2], "fam", "big")
"""


@pytest.mark.parametrize("point", ["copy", "install", "commit", "slow"])
def test_a_copy_killed_midway_leaves_no_half_written_object(tmp_path: Path, point: str) -> None:
    home = tmp_path / "home"
    Registry(home).close()
    big = checkpoint(tmp_path, "big", shards=3, size=8 * MB)
    if point == "slow":
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_ADD), str(home), str(big), point],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "copying"
        assert proc.stdout.readline().strip() == "copying"  # the first file is copied, the second started
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        proc.stdout.close()
    else:
        proc = child(KILLED_ADD, str(home), str(big), point)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    objects = home / "objects"
    leftovers = sorted(p.name for p in objects.iterdir() if p.name.startswith("."))
    keys = whole(objects)  # whatever has a final name is complete
    assert len(keys) == (1 if point == "commit" else 0)  # killed after the rename: complete, unreferenced
    assert len(leftovers) == (1 if point in ("copy", "install", "slow") else 0)
    with Registry(home) as reg:
        assert reg.list() == [] and reg.integrity() == "ok"
        v = reg.add(big, "fam", "big")  # adding again works, and reuses a complete object if there is one
        assert whole(objects) == [v.store_key] and v.bytes == sum(f.stat().st_size for f in big.iterdir())
        report = reg.gc()
        assert report.removed == [] and report.temporaries == len(leftovers)  # the killed copy's leftovers
        assert sorted(p.name for p in objects.iterdir()) == [v.store_key]
