"""LocalStore: round trip, zero-copy reads, quantized forms, damage, foreign packets, processes and faults."""

from __future__ import annotations

import resource
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.errors import CorruptPacketError, PacketNotFoundError
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.models import wrap_model
from kvpacket_rag.packet import KVPacket
from kvpacket_rag.store import LocalStore, StoreError, open_store

CHUNKS = ["Ada Lovelace was born in London in 1815.", "Grace Hopper wrote the first compiler."]


def assert_same(got: KVPacket, want: KVPacket) -> None:
    assert got.key == want.key
    assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert torch.equal(got.token_ids, want.token_ids)


def mapped_files(address: int) -> list[str]:
    """Files whose mapping in this process contains ``address``."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end and len(fields) == 6:
            out.append(fields[5])
    return out


def test_round_trip_is_exact_and_maps_the_file(tmp_path, packets):
    store = LocalStore(tmp_path / "s")
    keys = [store.put(p) for p in packets]
    assert store.put(packets[0]) == keys[0] and store.counters["puts"] == len(packets)  # second put: no-op
    for packet, got in zip(packets, store.get_many(keys)):
        assert_same(got, packet)
    got = store.get(keys[1])
    assert mapped_files(got.keys.data_ptr()) == [str(store.path_of(keys[1]))]  # a view of the file, no copy
    assert sorted(store.keys()) == sorted(keys) and store.contains(keys[2]) and keys[3] in store
    stats = store.stats()
    assert stats["packets"] == 4 and stats["bytes"] == sum(store.path_of(k).stat().st_size for k in keys)
    assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / sum(p.length for p in packets), abs=0.01)
    assert store.delete(keys[0]) and not store.delete(keys[0]) and not store.contains(keys[0])
    assert store.get_many([keys[0], keys[1]])[0] is None
    with pytest.raises(PacketNotFoundError):
        store.get(keys[0])
    reopened = LocalStore(tmp_path / "s")
    assert_same(reopened.get(keys[3]), packets[3])


def test_keys_are_validated_before_any_io(tmp_path):
    store = LocalStore(tmp_path / "s")
    for bad in ["../../etc/passwd", "A" * 64, "0" * 63, 12, "0" * 64 + "\n"]:
        with pytest.raises(ValueError, match="invalid packet key"):
            store.get(bad)
    assert not any((tmp_path / "s" / "packets").iterdir())


def test_refuses_a_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a packet store"):
        LocalStore(tmp_path)
    with pytest.raises(StoreError, match="is a file"):
        LocalStore(tmp_path / "notes.txt")
    assert isinstance(open_store(str(tmp_path / "new")), LocalStore)


def test_quantized_forms_are_separate_entries_under_the_packet_key(tmp_path, make_packet):
    packet = make_packet(1, dtype=torch.bfloat16)
    int8 = LocalStore(tmp_path / "s", quantization="int8")
    key = int8.put(packet)
    assert key == packet.key
    exact = LocalStore(tmp_path / "s")  # the same directory, default form
    assert exact.get_many([key]) == [None]  # an approximation is never returned for the exact packet
    got = int8.get(key)
    assert got.key == key and got.dtype == torch.bfloat16 and got.quantization == "none"
    assert (got.keys.float() - packet.keys.float()).abs().max() < 0.05 * packet.keys.float().abs().max()
    exact.put(packet, quantization="int4")  # per call
    assert int8.get(key, quantization="int4").key == key
    forms = exact.stats()["by_quantization"]
    assert set(forms) == {"int8", "int4"} and forms["int4"]["bytes_per_token"] < forms["int8"]["bytes_per_token"]


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        data[-40] ^= 0x10
        path.write_bytes(data)
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * (len(data) // 8))
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "flipped", "garbage"])
def test_damaged_entry_raises_is_quarantined_and_others_are_untouched(tmp_path, packets, how):
    store = LocalStore(tmp_path / "s")
    keys = [store.put(p) for p in packets]
    before = {k: store.path_of(k).read_bytes() for k in keys[1:]}
    damage(store.path_of(keys[0]), how)
    assert [(b.key, b.action) for b in store.verify()] == [(keys[0], "reported")]
    with pytest.raises(CorruptPacketError, match="quarantine"):
        store.get_many(keys)
    assert not store.contains(keys[0]) and not store.path_of(keys[0]).exists()
    assert len(list((tmp_path / "s" / "quarantine").glob("*.kvp"))) == 1
    assert store.get_many([keys[0]]) == [None]  # the next lookup is a miss: the engine rebuilds
    assert {k: store.path_of(k).read_bytes() for k in keys[1:]} == before
    for packet, got in zip(packets[1:], store.get_many(keys[1:])):
        assert_same(got, packet)
    assert store.verify() == [] and store.stats()["corrupt"] == 1
    store.put(packets[0])
    assert_same(store.get(keys[0]), packets[0])


def test_a_vanished_file_is_a_miss_not_damage(tmp_path, packets):
    store = LocalStore(tmp_path / "s")
    keys = [store.put(p) for p in packets]
    damage(store.path_of(keys[0]), "missing")  # as `rm` or gc in another process between lookup and open
    assert store.get_many(keys)[0] is None
    assert store.stats()["corrupt"] == 0 and not store.contains(keys[0])  # the dangling row is dropped
    assert store.verify() == []
    store.put(packets[0])
    assert_same(store.get(keys[0]), packets[0])


def test_on_corrupt_miss_reports_a_miss(tmp_path, packets):
    store = LocalStore(tmp_path / "s", on_corrupt="miss")
    keys = [store.put(p) for p in packets[:2]]
    damage(store.path_of(keys[1]), "flipped")
    got = store.get_many(keys)
    assert got[1] is None and got[0] is not None and store.counters["corrupt"] == 1


def test_a_foreign_packet_is_never_returned(tmp_path, make_packet):
    """A valid file of another model/adapter put in place of ours (or a copied index entry) is refused."""
    ours, theirs = make_packet(3), make_packet(3, model="model-b")
    assert ours.key != theirs.key
    store = LocalStore(tmp_path / "s")
    store.put(ours)
    store.put(theirs)
    store.path_of(ours.key).write_bytes(store.path_of(theirs.key).read_bytes())
    with sqlite3.connect(tmp_path / "s" / "index.sqlite") as db:
        db.execute("UPDATE packets SET size = (SELECT size FROM packets WHERE key = ?) WHERE key = ?",
                   (theirs.key, ours.key))
    with pytest.raises(CorruptPacketError, match="another model"):
        store.get(ours.key)
    assert_same(store.get(theirs.key), theirs)


def test_engine_never_reuses_packets_of_another_model(tmp_path, tiny_llama, tokenizer):
    torch.manual_seed(7)  # same architecture and name, other weights: another model fingerprint
    other = wrap_model(AutoModelForCausalLM.from_config(tiny_llama.model.config, attn_implementation="sdpa"),
                       tokenizer, "tiny-llama")
    assert other.fingerprint != tiny_llama.fingerprint
    first = PacketEngine(tiny_llama, adapter=None, store=LocalStore(tmp_path / "s"))
    keys = first.build_packets(CHUNKS)
    second = PacketEngine(other, adapter=None, store=LocalStore(tmp_path / "s"))
    assert second.build_packets(CHUNKS) != keys and second.counters["packets_built"] == len(CHUNKS)
    again = PacketEngine(tiny_llama, adapter=None, store=LocalStore(tmp_path / "s"))
    fetched = again.packets_for(CHUNKS)
    packets, again_keys = fetched.packets, fetched.keys
    assert again_keys == keys and again.counters["packets_built"] == 0
    for packet, built in zip(packets, first.bare_builder.build_many(CHUNKS)):  # what `first` built and stored
        assert_same(packet, built)
    generation = GenerationConfig(max_new_tokens=3)
    from_store = again.answer("Who wrote the first compiler?", CHUNKS, generation=generation)  # mapped read-only packets
    fresh = PacketEngine(tiny_llama, adapter=None).answer("Who wrote the first compiler?", CHUNKS, generation=generation)
    assert from_store.text == fresh.text


def test_file_without_index_entry_is_adopted(tmp_path, packets):
    store = LocalStore(tmp_path / "s")
    key = store.put(packets[0])
    with sqlite3.connect(tmp_path / "s" / "index.sqlite") as db:
        db.execute("DELETE FROM packets")
    assert [b.reason for b in store.verify()] == ["file without an index entry"]
    assert_same(store.get(key), packets[0])
    assert store.contains(key) and store.verify() == []


WRITER = """
import os, sys, time
from pathlib import Path
from kvpacket_rag.packet import KVPacket
from kvpacket_rag.store import LocalStore
store = LocalStore(sys.argv[1])
packets = [KVPacket.load(p) for p in sorted(Path(sys.argv[2]).glob("*.kvp"))]
go = Path(sys.argv[3])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.001)
for packet in packets:
    store.put(packet)
print("wrote", len(packets))
"""


def test_two_processes_write_the_same_keys_while_a_reader_reads(tmp_path, make_packet, popen_python):
    source = tmp_path / "src"
    source.mkdir()
    packets = [make_packet(seed, tokens=400, layers=4, heads=4, head_dim=64) for seed in range(6)]  # ~3 MB each
    for n, packet in enumerate(packets):
        packet.save(source / f"{n}.kvp")
    store = LocalStore(tmp_path / "s")
    go = tmp_path / "go"
    writers = [popen_python(WRITER, str(tmp_path / "s"), str(source), str(go)) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        assert all(w.poll() is None for w in writers), writers[0].communicate()[1] + writers[1].communicate()[1]
        time.sleep(0.05)
    go.touch()  # both writers start putting the same keys in the same order now
    keys = [p.key for p in packets]
    while any(w.poll() is None for w in writers):
        for packet, got in zip(packets, store.get_many(keys)):  # never partial: None or the whole packet
            if got is not None:
                assert_same(got, packet)
        time.sleep(0.01)  # leave the two cores to the writers
    for writer in writers:
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        assert "wrote 6" in out
    for packet, got in zip(packets, LocalStore(tmp_path / "s").get_many(keys)):
        assert_same(got, packet)
    assert store.verify() == [] and store.stats()["packets"] == 6
    assert not list((tmp_path / "s" / "tmp").iterdir())


KILLED_WRITER = """
import resource, signal, sys
from kvpacket_rag.packet import KVPacket
from kvpacket_rag.store import LocalStore
store = LocalStore(sys.argv[1])
packet = KVPacket.load(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # the kernel kills the process when the write crosses the limit
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
store.put(packet)
print("not killed")
"""


def test_a_writer_killed_mid_write_leaves_the_store_valid(tmp_path, make_packet, run_python):
    keep, big = make_packet(0), make_packet(1, tokens=2000, layers=4, heads=4, head_dim=64)
    store = LocalStore(tmp_path / "s")
    store.put(keep)
    big.save(tmp_path / "big.kvp")
    limit = len(big.to_bytes()) // 2
    result = run_python(KILLED_WRITER, str(tmp_path / "s"), str(tmp_path / "big.kvp"), str(limit))
    assert result.returncode == -signal.SIGXFSZ, result.stderr
    temp = list((tmp_path / "s" / "tmp").iterdir())
    assert len(temp) == 1 and temp[0].stat().st_size == limit  # killed half way through the packet
    assert store.get_many([big.key, keep.key])[0] is None
    assert_same(store.get(keep.key), keep)
    assert store.verify() == [] and store.stats()["temp_files"] == 1
    assert store.gc()["temp_files"] == 1 and not list((tmp_path / "s" / "tmp").iterdir())
    store.put(big)
    assert_same(store.get(big.key), big)


def test_disk_full_gives_a_clear_error_and_changes_nothing(tmp_path, make_packet):
    store = LocalStore(tmp_path / "s")
    keep, big = make_packet(0), make_packet(1, tokens=2000, layers=4, heads=4, head_dim=64)
    store.put(keep)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # writes past 1 MiB fail (EFBIG), like a full disk
    try:
        with pytest.raises(StoreError, match="no space .* nothing was changed"):
            store.put(big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not store.contains(big.key) and not store.path_of(big.key).exists()
    assert not list((tmp_path / "s" / "tmp").iterdir())
    assert store.verify() == [] and store.stats()["packets"] == 1
    store.put(big)
    assert_same(store.get(big.key), big)


READ_ONLY = """
import sys
from kvpacket_rag.packet import KVPacket
from kvpacket_rag.store import LocalStore, StoreError
store = LocalStore(sys.argv[1])
print("read_only", store.read_only)
print("got", store.get(sys.argv[2]).key == sys.argv[2])
try:
    store.put(KVPacket.load(sys.argv[3]))
    print("put succeeded")
except StoreError as error:
    print("StoreError:", error)
"""


def test_read_only_directory_reads_and_refuses_writes(tmp_path, make_packet, run_python):
    store = LocalStore(tmp_path / "s")
    keep, new = make_packet(0), make_packet(1)
    store.put(keep)
    store.close()
    new.save(tmp_path / "new.kvp")
    tree = [tmp_path / "s", *(tmp_path / "s").rglob("*")]
    for path in tree:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        try:
            result = run_python(READ_ONLY, str(tmp_path / "s"), keep.key, str(tmp_path / "new.kvp"), unprivileged=True)
        except subprocess.SubprocessError as error:
            pytest.skip(f"cannot drop root's permission override here: {error}")
    finally:
        for path in tree:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert result.returncode == 0, result.stderr
    assert "read_only True" in result.stdout and "got True" in result.stdout
    assert "StoreError:" in result.stdout and "read-only" in result.stdout
    reopened = LocalStore(tmp_path / "s")
    assert reopened.verify() == [] and list(reopened.keys()) == [keep.key]


def test_gc_by_budget_age_and_foreign_fingerprints(tmp_path, make_packet):
    store = LocalStore(tmp_path / "s")
    mine = [make_packet(n) for n in range(3)]
    foreign = make_packet(9, adapter="adapter-old")
    for packet in [*mine, foreign]:
        store.put(packet)
    assert store.gc(keep_model="model-a", keep_adapters=["adapter-a"], dry_run=True)["removed"] == 1
    assert store.contains(foreign.key)
    assert store.gc(keep_model="model-a", keep_adapters=["adapter-a"])["removed"] == 1
    assert not store.contains(foreign.key)
    with sqlite3.connect(tmp_path / "s" / "index.sqlite") as db:  # mine[0] least recently used
        db.execute("UPDATE packets SET last_used = last_used - 1000 WHERE key = ?", (mine[0].key,))
    size = store.path_of(mine[1].key).stat().st_size
    assert store.gc(max_bytes=2 * size)["removed"] == 1 and not store.contains(mine[0].key)
    assert store.gc(max_age_s=3600)["removed"] == 0
    assert store.gc(max_age_s=0)["removed"] == 2 and store.stats()["packets"] == 0
