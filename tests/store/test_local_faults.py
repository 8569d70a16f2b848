"""LocalStore faults: put/rm/gc racing readers in several processes, a deleted or damaged index, lock timeouts."""

from __future__ import annotations

import resource
import sqlite3
import time

import pytest
import torch

from kvpacket_rag.store import LocalStore, StoreError

RACER = """
import sys, time
from pathlib import Path
from kvpacket_rag.errors import PacketNotFoundError
from kvpacket_rag.packet import KVPacket
from kvpacket_rag.store import LocalStore
role, root, source, seconds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
store = LocalStore(root, busy_timeout_s=30)
packets = [KVPacket.load(p) for p in sorted(source.glob("*.kvp"))]
keys = [p.key for p in packets]
done, found, deadline = 0, 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    if role == "put":
        store.put_many(packets)
    elif role == "rm":
        for key in keys:
            store.delete(key)
    elif role == "gc":
        store.gc(max_bytes=0)
    else:
        got = store.get_many(keys)  # any exception fails the child
        for key, packet in zip(keys, got):
            assert packet is None or packet.key == key
        found += sum(p is not None for p in got)
    done += 1
print(role, done, found, store.stats()["corrupt"])
"""


def test_put_rm_and_gc_racing_a_reader_in_processes(tmp_path, make_packet, popen_python):
    source = tmp_path / "src"
    source.mkdir()
    for seed in range(6):
        make_packet(seed).save(source / f"{seed}.kvp")
    LocalStore(tmp_path / "s").close()
    racers = [popen_python(RACER, role, str(tmp_path / "s"), str(source), "2.0") for role in ("put", "rm", "gc", "get")]
    outputs = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        outputs.append(out.split())
    readers = [o for o in outputs if o[0] == "get"]
    assert all(int(o[1]) > 0 for o in outputs)  # every process ran its loop
    assert all(o[3] == "0" for o in outputs)  # a vanished file is a miss: nothing counted as corrupt
    store = LocalStore(tmp_path / "s")
    for entry in store.entries():  # no index row without its file
        assert store.path_of(entry["key"]).is_file()
    assert store.verify() == [] and sum(int(o[2]) for o in readers) > 0, outputs  # hits and misses both seen


def test_index_deleted_while_in_use_loses_no_packet(tmp_path, packets):
    store = LocalStore(tmp_path / "s")
    keys = [store.put(p) for p in packets]
    for path in (tmp_path / "s").glob("index.sqlite*"):
        path.unlink()
    assert store.get(keys[0]).key == keys[0]  # this process keeps its open index
    fresh = LocalStore(tmp_path / "s")  # a new index: the files are adopted on read or by verify
    assert fresh.get(keys[1]).key == keys[1]
    assert {b.action for b in fresh.verify(quarantine=True)} == {"indexed"}
    assert sorted(fresh.keys()) == sorted(keys) and fresh.verify() == []


def test_damaged_index_gives_a_typed_error_and_is_rebuilt_from_the_files(tmp_path, packets):
    store = LocalStore(tmp_path / "s")
    keys = [store.put(p) for p in packets]
    store.close()
    index = tmp_path / "s" / "index.sqlite"
    index.write_bytes(b"this is not a database" * 200)
    with pytest.raises(StoreError, match="move index.sqlite aside"):
        LocalStore(tmp_path / "s")
    index.rename(tmp_path / "damaged-index.sqlite")
    for path in (tmp_path / "s").glob("index.sqlite-*"):
        path.unlink()
    rebuilt = LocalStore(tmp_path / "s")
    rebuilt.verify(quarantine=True)
    assert sorted(rebuilt.keys()) == sorted(keys)
    assert torch.equal(rebuilt.get(keys[2]).keys, packets[2].keys)


def test_index_damaged_under_an_open_store_raises_store_error(tmp_path, packets):
    store = LocalStore(tmp_path / "s")
    store.put(packets[0])
    store.close()
    store = LocalStore(tmp_path / "s")
    (tmp_path / "s" / "index.sqlite").write_bytes(b"\x00garbage" * 4096)
    with pytest.raises(StoreError, match="index"):
        store.stats()
    with pytest.raises(StoreError, match="index"):
        store.put(packets[1])


def test_lock_timeout_is_a_store_error_and_changes_nothing(tmp_path, packets):
    store = LocalStore(tmp_path / "s", busy_timeout_s=0.2)
    store.put(packets[0])
    holder = sqlite3.connect(tmp_path / "s" / "index.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot lock the index"):
            store.put(packets[1])
        assert time.monotonic() - started < 5
        with pytest.raises(StoreError, match="cannot lock the index"):
            store.delete(packets[0].key)
        assert store.get(packets[0].key).key == packets[0].key  # readers are not blocked
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not store.path_of(packets[1].key).exists() and not list((tmp_path / "s" / "tmp").iterdir())
    store.put(packets[1])
    assert store.verify() == [] and store.stats()["packets"] == 2


def test_inspecting_a_missing_store_does_not_create_one(tmp_path):
    with pytest.raises(StoreError, match="no packet store"):
        LocalStore(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()


def test_a_failed_store_write_still_answers(tmp_path, tiny_llama, caplog):
    from kvpacket_rag.engine import PacketEngine
    from kvpacket_rag.generation import GenerationConfig

    store = LocalStore(tmp_path / "s")
    engine = PacketEngine(tiny_llama, adapter=None, store=store)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))  # every packet write fails, as on a full disk
    try:
        answer = engine.answer("Who was born in London?", ["Ada Lovelace was born in London."],
                               generation=GenerationConfig(max_new_tokens=2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert answer.text is not None and engine.counters["packets_built"] == 1
    assert "could not store 1 new packets" in caplog.text and "no space" in caplog.text
    assert store.stats()["packets"] == 0 and not list((tmp_path / "s" / "tmp").iterdir())
