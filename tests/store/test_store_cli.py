"""`kvpacket store stats|verify|gc|rm`."""

from __future__ import annotations

import json

from kvpacket_rag.cli import main
from kvpacket_rag.store import LocalStore


def test_store_commands(tmp_path, packets, capsys, redis_url, redis_prefix):
    store = LocalStore(tmp_path / "s")
    keys = [store.put(p) for p in packets]
    spec = str(tmp_path / "s")
    assert main(["store", "stats", "--store", spec, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["packets"] == 4 and stats["bytes_per_token"] > 0
    assert main(["store", "verify", "--store", spec]) == 0
    path = store.path_of(keys[0])
    path.write_bytes(path.read_bytes()[:100])
    assert main(["store", "verify", "--store", spec]) == 1
    assert keys[0] in capsys.readouterr().out
    assert main(["store", "verify", "--store", spec, "--quarantine"]) == 1
    assert main(["store", "verify", "--store", spec]) == 0
    assert main(["store", "rm", "--store", spec, keys[1]]) == 0
    assert main(["store", "rm", "--store", spec, keys[1]]) == 1
    assert main(["store", "gc", "--store", spec, "--max-bytes", "1", "--dry-run"]) == 0
    assert "would remove 2 entries" in capsys.readouterr().out
    assert main(["store", "gc", "--store", spec, "--model-fingerprint", "model-b"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out and store.stats()["packets"] == 0
    assert main(["store", "stats", "--store", "redis://127.0.0.1:1/0"]) == 4  # unreachable: clear error
    assert "cannot reach Redis" in capsys.readouterr().err
    assert main(["store", "stats", "--store", redis_url, "--prefix", redis_prefix]) == 0
    assert "redis store" in capsys.readouterr().out


def test_inspecting_a_store_that_does_not_exist_creates_nothing(tmp_path, capsys):
    for action in ("verify", "stats", "gc"):
        assert main(["store", action, "--store", str(tmp_path / "typo")]) == 2
        err = capsys.readouterr().err
        assert "no packet store at" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "typo").exists()


def test_verify_lists_every_lying_entry_and_quarantines_them_all(tmp_path, make_packet, capsys):
    from packet_lies import LIES, rewrite

    store = LocalStore(tmp_path / "s")
    keys = [store.put(make_packet(seed)) for seed in range(5)]
    for key, (_, lie) in zip(keys[:4], LIES[:4]):
        store.path_of(key).write_bytes(rewrite(store.path_of(key).read_bytes(), lie))
    assert main(["store", "verify", "--store", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert all(key in out for key in keys[:4]) and keys[4] not in out and "4 bad entries" in out
    assert main(["store", "verify", "--store", str(tmp_path / "s"), "--quarantine"]) == 1
    assert out.count("[reported]") == 4 and capsys.readouterr().out.count("[quarantined]") == 4
    assert main(["store", "verify", "--store", str(tmp_path / "s")]) == 0


def test_bad_documents_get_one_line_naming_the_file(tmp_path, capsys):
    docs = tmp_path / "docs"
    (docs / "x.md").mkdir(parents=True)  # a directory with a document's name
    (docs / "good.txt").write_text("Ada Lovelace was born in London.")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert main(["build", "--docs", str(tmp_path / "latin1.txt"), "--store", str(tmp_path / "s")]) == 3
    err = capsys.readouterr().err
    assert "latin1.txt is not UTF-8" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["build", "--docs", str(tmp_path / "nothing.txt"), "--store", str(tmp_path / "s")]) == 2
    assert "nothing.txt does not exist" in capsys.readouterr().err
    from kvpacket_rag.cli.ask import read_documents

    assert [name for name, _ in read_documents([docs])] == ["good.txt"]


def test_a_model_that_cannot_be_fetched_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "doc.txt").write_text("Ada Lovelace was born in London.")
    status = main(["ask", "--docs", str(tmp_path / "doc.txt"), "--question", "Where?", "--model",
                   "no-such-organisation/no-such-model-3f9a"])
    err = capsys.readouterr().err
    assert status == 4 and "cannot load model 'no-such-organisation/no-such-model-3f9a'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_exit_status_of_each_kind_of_failure():
    from kvpacket_rag.cli import exit_status
    from kvpacket_rag.errors import CorruptPacketError, EmptyInputError
    from kvpacket_rag.store import StoreError, StoreUnavailableError

    assert exit_status(CorruptPacketError("x")) == 3 and exit_status(StoreUnavailableError("x")) == 4
    assert exit_status(StoreError("x")) == 2 and exit_status(EmptyInputError("x")) == 2
    assert exit_status(RuntimeError("x")) == 70


def test_a_model_without_a_shipped_adapter_speaks_in_options(tmp_path, tiny_llama, capsys):
    tiny_llama.model.save_pretrained(tmp_path / "model")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "doc.txt").write_text("Ada Lovelace was born in London.")
    capsys.readouterr()  # the save's progress bar
    status = main(["ask", "--docs", str(tmp_path / "doc.txt"), "--question", "Where?", "--model", str(tmp_path / "model")])
    err = capsys.readouterr().err
    assert status == 2 and "pass --adapter none" in err and "adapter=None" not in err
    assert len(err.strip().splitlines()) == 1


def test_gc_by_model_keeps_the_packets_its_engine_reads(default_model, tmp_path, capsys):
    from kvpacket_rag.engine import PacketEngine

    store = LocalStore(tmp_path / "s")
    engine = PacketEngine(default_model, store=store)  # the shipped adapter and the default method
    engine.ingest_packets(["Quill Press was founded in 1988.", "Harbor Bank is based in Halifax."])
    engine.build_packets(["Quill Press was founded in 1988."], "bare")
    assert store.stats()["packets"] == 5
    assert main(["store", "gc", "--store", str(tmp_path / "s"), "--model", "default"]) == 0
    assert "removed 0 entries" in capsys.readouterr().out and store.stats()["packets"] == 5
    assert main(["store", "gc", "--store", str(tmp_path / "s"), "--model", "default", "--adapter", "none"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out  # the adapter packets; bare and exact ones are kept


def test_build_and_ask_with_neighbour_calibration_share_packets(tmp_path, tiny_llama, capsys):
    """`build --calibrate-neighbours` stores packets that `ask` with the same documents and options reads."""
    tiny_llama.model.save_pretrained(tmp_path / "model")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "model")
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in {"a.txt": "Ada Lovelace was born in London.", "b.txt": "Charles Babbage lived in London.",
                       "c.txt": "Basalt is a volcanic rock."}.items():
        (docs / name).write_text(text)
    common = ["--docs", str(docs), "--model", str(tmp_path / "model"), "--adapter", "none+preamble",
              "--store", str(tmp_path / "s")]
    calibrated = ["--calibrate-neighbours", "2", "--calibration-contexts", "1", "--calibration-depth", "1"]
    capsys.readouterr()
    assert main(["build", *common, *calibrated]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert main(["build", *common]) == 0
    assert set(keys).isdisjoint(line.split()[0] for line in capsys.readouterr().out.splitlines())
    assert main(["ask", *common, *calibrated, "--question", "Where?", "--max-new-tokens", "2", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["packets_built"] == 0 and answer["method"] == "kv_packet_first_exact"
