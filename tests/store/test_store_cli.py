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
    assert main(["store", "stats", "--store", "redis://127.0.0.1:1/0"]) == 2  # unreachable: clear error
    assert "cannot reach Redis" in capsys.readouterr().err
    assert main(["store", "stats", "--store", redis_url, "--prefix", redis_prefix]) == 0
    assert "redis store" in capsys.readouterr().out
