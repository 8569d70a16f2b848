"""Facts every benchmark records next to its figures, and the adapter specs the quality scripts share."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
from pathlib import Path

import torch


FIRST_EXACT = "@first-exact"
"""Suffix of an adapter spec whose packets are read with the first chunk exact (``kv_packet_first_exact``)."""


def split_first_exact(spec: str) -> tuple[str, bool]:
    """``"ADAPTER[@first-exact]"`` -> ``(ADAPTER, whether the first chunk is read exactly)``."""
    adapter = spec.removesuffix(FIRST_EXACT)
    return adapter, adapter != spec


def machine_info(threads: int) -> dict:
    """Machine, software and thread count, for the result header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": sys.version.split()[0],
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["kvpacket", *sys.argv[1:]]) if _is_kvpacket_cli(sys.argv[0] if sys.argv else "")
            else " ".join(sys.argv)}


def _is_kvpacket_cli(program: str) -> bool:
    """Whether ``program`` (``sys.argv[0]``) is the ``kvpacket`` command or ``python -m kvpacket_rag``."""
    path = Path(program)
    return path.name == "kvpacket" or (path.name == "__main__.py" and path.parent.name == "kvpacket_rag")


def engine_header(engine, threads: int, **extra) -> dict:
    """The engine's model, device, dtype and adapter, then ``extra`` (e.g. the store), the thread count and
    `machine_info`: the first keys of every engine benchmark's result."""
    model = engine.model
    return {"model": model.name, "device": str(model.device), "dtype": str(model.dtype),
            "adapter": engine.adapter.fingerprint[:12], **extra, "threads": threads, "machine": machine_info(threads)}


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_outputs(result: dict, table: str, json_path: str | None) -> None:
    """Write ``result`` as JSON (and the table next to it as .md); print the table."""
    print(table)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        path.with_suffix(".md").write_text(table + "\n")
