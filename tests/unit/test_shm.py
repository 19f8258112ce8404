"""The shared-memory ring on its own: order, wrap-around, back-pressure, cleanup."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gristmill.client import shm
from gristmill.client.arrays.store import _RingPool, is_loopback
from gristmill.client.errors import FailedPrecondition, InvalidArgument
from gristmill.client.shm import RingClosed, RingReader, RingWriter


def test_records_arrive_in_order_through_wrap_around_and_back_pressure(shm_dir: Path) -> None:
    reader = RingReader.create(64 * 1024, shm_dir)
    writer = RingWriter.open(shm_dir, reader.name, reader.capacity)
    reader.attached()
    rng = random.Random(7)
    records = [[rng.randbytes(rng.randint(0, 9000)) for _ in range(rng.randint(1, 4))]
               for _ in range(300)]
    slices: list[tuple[int, int, int]] = []

    def produce() -> None:
        for parts in records:
            slices.append(writer.write(parts, lambda: True))

    producer = threading.Thread(target=produce)
    producer.start()
    got = []
    for i in range(len(records)):
        while len(slices) <= i:
            time.sleep(0.0005)
        offset, length, release = slices[i]
        got.append(reader.view(offset, length).tobytes())
        reader.release(release)
        if i % 50 == 0:
            time.sleep(0.01)  # a slow consumer: the writer has to wait
    producer.join()
    assert got == [b"".join(parts) for parts in records]
    assert sum(len(g) for g in got) > 10 * reader.capacity  # it wrapped many times
    assert max(o + n for o, n, _ in slices) <= reader.capacity
    writer.close()
    reader.close()


def test_the_writer_stops_waiting_when_the_stream_ends(shm_dir: Path) -> None:
    reader = RingReader.create(4096, shm_dir)
    writer = RingWriter.open(shm_dir, reader.name, reader.capacity)
    writer.write([b"x" * 4000], lambda: True)  # nothing released: the ring is full
    active = [True]
    threading.Timer(0.05, lambda: active.__setitem__(0, False)).start()
    with pytest.raises(RingClosed):
        writer.write([b"y" * 100], lambda: active[0])
    assert not writer.fits(4097)
    writer.close()
    reader.close()


def test_the_server_unlinks_the_name_and_the_reader_cleans_up_if_it_did_not(
        shm_dir: Path) -> None:
    reader = RingReader.create(4096, shm_dir)
    assert [p.name for p in shm_dir.iterdir()] == [reader.name]
    writer = RingWriter.open(shm_dir, reader.name, reader.capacity)
    assert not list(shm_dir.iterdir())
    writer.close()
    reader.close()
    unopened = RingReader.create(4096, shm_dir)
    unopened.close()
    assert not list(shm_dir.iterdir())


def test_bad_rings_are_refused_with_the_reason(shm_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match="ring.name"):
        RingWriter.open(shm_dir, "../../etc/passwd", 4096)
    with pytest.raises(InvalidArgument, match="ring.capacity"):
        RingWriter.open(shm_dir, "gristmill-ring-x", 0)
    with pytest.raises(FailedPrecondition, match="another host") as missing:
        RingWriter.open(shm_dir, "gristmill-ring-nothere", 4096)
    assert missing.value.reason == shm.RING_UNAVAILABLE
    with pytest.raises(FailedPrecondition, match="ingest.shm_dir"):
        RingWriter.open(None, "gristmill-ring-x", 4096)
    reader = RingReader.create(8192, shm_dir)
    with pytest.raises(FailedPrecondition, match="the request says"):
        RingWriter.open(shm_dir, reader.name, 4096)
    reader.close()
    (shm_dir / "gristmill-ring-fake").write_bytes(b"\0" * (4096 + 4096))
    with pytest.raises(FailedPrecondition, match="not a gristmill ring"):
        RingWriter.open(shm_dir, "gristmill-ring-fake", 4096)
    (shm_dir / "gristmill-ring-fake").unlink()


def test_a_ring_larger_than_shared_memory_is_a_clear_error(shm_dir: Path) -> None:
    st = os.statvfs(shm_dir)
    with pytest.raises(FailedPrecondition, match="bigger /dev/shm") as info:
        RingReader.create(st.f_blocks * st.f_frsize + (1 << 30), shm_dir)
    assert info.value.reason == shm.RING_UNAVAILABLE
    assert not list(shm_dir.iterdir())


def test_sweep_removes_rings_whose_creator_died_before_a_server_opened_them(
        shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = ("import os, sys; from pathlib import Path; from gristmill.client.shm import "
            "RingReader; r = RingReader.create(4096, Path(sys.argv[1])); print(r.name, "
            "flush=True); os.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", code, str(shm_dir)], capture_output=True,
                         text=True, timeout=60)
    orphan = out.stdout.strip()
    assert out.returncode == -9 and (shm_dir / orphan).exists()
    alive = RingReader.create(4096, shm_dir)
    assert shm.sweep(shm_dir) == 0  # too young to be judged
    monkeypatch.setattr(shm, "STALE_AFTER", 0.0)
    assert shm.sweep(shm_dir) == 1  # the dead one; the live one is locked
    assert [p.name for p in shm_dir.iterdir()] == [alive.name]
    alive.close()


def test_a_private_ring_has_no_name_and_serves_a_writer_in_this_process(
        shm_dir: Path) -> None:
    reader = RingReader.private(4096)
    writer = reader.local_writer()
    assert reader.name == "" and not list(shm_dir.iterdir())
    offset, length, release = writer.write([b"abc", bytes(range(10))], lambda: True)
    assert reader.view(offset, length).tobytes() == b"abc" + bytes(range(10))
    reader.release(release)
    writer.close()
    reader.close()


def test_a_record_that_starts_over_waits_only_for_records_not_yet_released(
        shm_dir: Path) -> None:
    reader = RingReader.create(4096, shm_dir)
    writer = RingWriter.open(shm_dir, reader.name, reader.capacity)
    _, _, release = writer.write([b"a" * 1500], lambda: True)
    reader.release(release)
    # 3000 bytes do not fit behind the first record: they start over at 0, and the
    # skipped tail of the ring holds nothing to wait for
    asked: list[bool] = []

    def active() -> bool:
        asked.append(True)
        return True

    offset, length, _ = writer.write([b"b" * 1000, np.full((10, 100, 2), 7, np.uint8)],
                                     active)
    assert (offset, length) == (0, 3000)
    assert len(asked) == 1  # once, just before writing: it never waited for space
    assert reader.view(offset, length).tobytes() == b"b" * 1000 + b"\7" * 2000
    writer.close()
    reader.close()


def test_a_ring_without_reserved_memory_is_refused(shm_dir: Path) -> None:
    path = shm_dir / "gristmill-ring-sparse"
    with open(path, "wb") as f:  # the right header, the rest a hole
        f.write(shm.MAGIC + (4096).to_bytes(8, "little"))
        f.truncate(shm.HEADER + 4096)
    with pytest.raises(FailedPrecondition, match="no memory reserved"):
        RingWriter.open(shm_dir, path.name, 4096)
    path.unlink()


@pytest.mark.parametrize("address,local", [
    ("127.0.0.1:7450", True), ("127.3.4.5:1", True), ("localhost:7450", True),
    ("[::1]:7450", True), ("10.0.0.7:7450", False), ("store.svc:7450", False),
    ("[2001:db8::1]:7450", False), ("localhost.example.com:7450", False),
])
def test_rings_are_tried_only_for_loopback_addresses(address: str, local: bool) -> None:
    assert is_loopback(address) is local


def test_a_ring_refusal_turns_rings_off_only_in_automatic_mode() -> None:
    refusal = FailedPrecondition("no ring", reason=shm.RING_UNAVAILABLE)
    other = FailedPrecondition("something else", reason="OTHER")
    auto = _RingPool(None, "127.0.0.1:1")
    assert auto.on and not auto.refused(other) and auto.on
    assert auto.refused(refusal) and not auto.on and auto.take() is None
    assert not _RingPool(None, "10.0.0.7:1").on  # another host: never tried
    required = _RingPool(True, "10.0.0.7:1")
    assert required.on and not required.refused(refusal) and required.on
    assert not _RingPool(False, "127.0.0.1:1").on


def test_a_writer_whose_call_ended_writes_nothing_more(shm_dir: Path) -> None:
    reader = RingReader.create(4096, shm_dir)
    writer = RingWriter.open(shm_dir, reader.name, reader.capacity)
    with pytest.raises(RingClosed):
        writer.write([b"late" * 10], lambda: False)
    assert reader.view(0, 40).tobytes() == bytes(40)
    writer.close()
    reader.close()


def test_a_writer_checks_the_token_and_takes_the_ring_alone(shm_dir: Path) -> None:
    reader = RingReader.create(4096, shm_dir)
    other = RingReader.create(4096, shm_dir)
    assert len(reader.token) == shm.TOKEN_BYTES and reader.token != other.token
    with pytest.raises(FailedPrecondition, match="token differs"):
        RingWriter.open(shm_dir, reader.name, reader.capacity, token=other.token)
    with pytest.raises(InvalidArgument, match="ring.token"):
        RingWriter.open(shm_dir, reader.name, reader.capacity, token=b"short")
    first = RingWriter.open(shm_dir, reader.name, reader.capacity, token=reader.token,
                            keep_name=True, lock_wait=0)
    with pytest.raises(FailedPrecondition, match="still written by another call"):
        RingWriter.open(shm_dir, reader.name, reader.capacity, token=reader.token,
                        keep_name=True, lock_wait=0.2)
    first.close()  # the lock goes with the descriptor
    second = RingWriter.open(shm_dir, reader.name, reader.capacity, token=reader.token,
                             keep_name=True, lock_wait=0)
    assert (shm_dir / reader.name).exists()  # keep_name: the client removes it
    second.close()
    reader.close()
    other.close()


def test_a_busy_ring_is_its_own_reason_and_a_gone_client_stops_the_wait(shm_dir: Path) -> None:
    reader = RingReader.create(4096, shm_dir)
    holder = RingWriter.open(shm_dir, reader.name, reader.capacity, token=reader.token,
                             keep_name=True, lock_wait=0)
    with pytest.raises(FailedPrecondition) as busy:
        RingWriter.open(shm_dir, reader.name, reader.capacity, token=reader.token,
                        keep_name=True, lock_wait=0.1)
    assert busy.value.reason == shm.RING_BUSY
    start = time.monotonic()
    with pytest.raises(RingClosed):
        RingWriter.open(shm_dir, reader.name, reader.capacity, token=reader.token,
                        keep_name=True, lock_wait=30, is_active=lambda: False)
    assert time.monotonic() - start < 5
    with pytest.raises(FailedPrecondition, match="without its token") as missing:
        RingWriter.open(shm_dir, reader.name, reader.capacity, token=b"")
    assert missing.value.reason == shm.RING_UNAVAILABLE
    assert (shm_dir / reader.name).exists()
    holder.close()
    reader.close()
