"""`kvpacket bench store`: packet store throughput and packet quantization, against a raw read ceiling.

What is measured, in one run on one clock:

- write throughput of `LocalStore` (encode + write + fsync + rename + index) and `RedisStore`;
- read throughput (GB/s of stored bytes, packets/s) of `LocalStore` warm (page cache) and cold
  (pages evicted with ``posix_fadvise(DONTNEED)``, or ``drop_caches`` when permitted),
  `MemoryCache` hits, `RedisStore.get_many` over loopback TCP and a Unix socket (server with two
  I/O threads) against a parser-free socket ``GET`` of the same values, and int8/int4 `LocalStore`
  reads, each against a raw ``readinto`` of the same files;
- the question path per form: read plus assembly (decode, rotate, copy) into a model-shaped
  buffer, bf16 vs int8 vs int4 from the same kind of store;
- `RedisStore.put_many` against a parser-free socket ``SET`` of the same bytes (write ceiling);
- bytes per token for fp32 / bf16 / int8 / int4 packets and the reconstruction error of int8 / int4.

Packets: ``--real`` packets built by the default model (SmolLM2-135M, bare: no adapter) from NIAH
essay text cut to ``--tokens`` tokens give the sizes and quantization errors; the throughput set is
``--packets`` packets with those real tensors in ``--dtype`` and distinct token ids (distinct keys).
Reads go ``--batch`` keys per `get_many` call (one question's retrieval).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import redis as redis_lib
import torch
import xxhash

from ..kvcache import KVBuffer, assemble
from ..packet import KVPacket, encode_packet, reconstruction_error
from ..store import LocalStore, MemoryCache
from ..tuning import set_threads, tune_malloc
from .common import machine_info, median, peak_rss_mb, write_outputs

FORMS = ("fp32", "bf16", "int8", "int4")
REDIS_SERVER_OPTIONS = ("--io-threads", "2", "--io-threads-do-reads", "yes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--packets", type=int, default=200, help="packets in the throughput set (bf16 512 tokens: ~12 MB each)")
    parser.add_argument("--tokens", type=int, default=512, help="chunk tokens per packet")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--real", type=int, default=4, help="packets built by the real model (sizes, quantization error)")
    parser.add_argument("--quantized-packets", type=int, default=50, help="packets in the int8/int4 read set")
    parser.add_argument("--batch", type=int, default=8, help="keys per get_many call")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="directory for the stores (default: a temporary directory)")
    parser.add_argument("--redis-url", default=None,
                        help="Redis to use (default: start redis-server on a free loopback port and a Unix socket; "
                             "skipped if absent)")
    parser.add_argument("--json", default=None, help="write the result here (and a .md table beside it)")


# ---- packets --------------------------------------------------------------------------------


def real_packets(n: int, tokens: int) -> tuple[list[KVPacket], object]:
    """``n`` bare packets of the default model over ``tokens`` tokens of essay text each, and the model."""
    from ..datasets import load_samples
    from ..engine import PacketEngine

    engine = PacketEngine(adapter=None)
    sample = load_samples("niah", "test", 1, n_chunks=n, chunk_words=int(tokens * 1.2))[0]
    ids = [engine.model.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens] for text in sample.chunks]
    return engine.builder.build_many(ids), engine.model


def replicas(base: KVPacket, n: int, dtype: torch.dtype) -> list[KVPacket]:
    """``n`` packets sharing ``base``'s tensors (in ``dtype``) with distinct token ids, hence distinct keys."""
    keys, values = base.keys.to(dtype), base.values.to(dtype)
    out = []
    for i in range(n):
        ids = base.token_ids.clone()
        ids[0] = 1_000_000 + i
        out.append(KVPacket(keys, values, ids, base.n_header, base.n_trailer, base.model_fingerprint,
                            base.tokenizer_fingerprint, base.adapter_fingerprint))
    return out


# ---- timing helpers -------------------------------------------------------------------------


def rate(seconds: float, n_bytes: int, n_packets: int) -> dict:
    return {"s": round(seconds, 4), "GB_per_s": round(n_bytes / seconds / 1e9, 3),
            "packets_per_s": round(n_packets / seconds, 1)}


def timed_passes(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (after none: callers warm up as they need)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def batches(keys: list[str], size: int) -> list[list[str]]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def read_all(store, keys: list[str], batch: int) -> None:
    for group in batches(keys, batch):
        got = store.get_many(group)
        assert all(p is not None for p in got), "a packet went missing during the benchmark"
        del got


def raw_read(paths: list[Path], buffer: bytearray, checksum: bool = False) -> None:
    """Read each file into one preallocated buffer (the ceiling), optionally hashing it with xxh3."""
    view = memoryview(buffer)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            n = handle.readinto(view)
        if checksum:
            xxhash.xxh3_128(view[:n]).hexdigest()


def evict(paths: list[Path]) -> str:
    """Drop the files' pages from the page cache (per file; system-wide drop_caches only if that fails); return how."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    left = resident_fraction(paths)
    if left is None or left < 0.01:
        return f"posix_fadvise(DONTNEED) per file (page-cache residency after: {left})"
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return f"drop_caches (posix_fadvise left {left:.0%} resident)"
    except OSError:
        return f"posix_fadvise(DONTNEED) per file, {left:.0%} still resident (drop_caches not permitted)"


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (util-linux `fincore`), None if unavailable."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", *map(str, paths)], capture_output=True, text=True, check=False)
    resident = total = 0
    for line in out.stdout.splitlines():
        res, size = line.split()
        resident, total = resident + int(res), total + int(size)
    return round(resident / total, 4) if total else None


# ---- measurements ---------------------------------------------------------------------------


def measure_local(packets: list[KVPacket], root: Path, batch: int, repeats: int, model) -> dict:
    store = LocalStore(root)
    start = time.perf_counter()
    keys = [store.put(p) for p in packets]
    write_s = time.perf_counter() - start
    paths = [store.path_of(k) for k in keys]
    total = sum(p.stat().st_size for p in paths)
    buffer = bytearray(max(p.stat().st_size for p in paths))
    raw_read(paths, buffer)  # warm the page cache
    read_all(store, keys, batch)
    out = {"bytes": total, "packets": len(keys), "write": rate(write_s, total, len(keys))}
    out["raw_read_warm"] = rate(timed_passes(lambda: raw_read(paths, buffer), repeats), total, len(keys))
    out["raw_read_xxh3_warm"] = rate(timed_passes(lambda: raw_read(paths, buffer, True), repeats), total, len(keys))
    out["local_warm"] = rate(timed_passes(lambda: read_all(store, keys, batch), repeats), total, len(keys))
    out["local_assemble_warm"] = measure_assembly(store, keys, batch, repeats, model, total)
    cold_raw, cold_local, residency = [], [], []
    for _ in range(repeats):
        out["eviction"] = evict(paths)
        residency.append(resident_fraction(paths))  # measured after eviction, before the read
        cold_raw.append(timed_passes(lambda: raw_read(paths, buffer), 1))
        evict(paths)
        cold_local.append(timed_passes(lambda: read_all(store, keys, batch), 1))
    out["resident_after_eviction"] = residency[0]
    out["raw_read_cold"] = rate(median(cold_raw), total, len(keys))
    out["local_cold"] = rate(median(cold_local), total, len(keys))
    raw_read(paths, buffer)
    cache = MemoryCache(store, max_bytes=sum(p.nbytes for p in packets) + 1)
    read_all(cache, keys, batch)  # fill
    out["memory_cache_hits"] = rate(timed_passes(lambda: read_all(cache, keys, batch), repeats), total, len(keys))
    out["memory_cache"] = cache.stats()["cache"]
    cache.clear()
    out["warm_local_vs_raw"] = round(out["raw_read_warm"]["s"] / out["local_warm"]["s"], 3)
    out["cold_local_vs_raw"] = round(out["raw_read_cold"]["s"] / out["local_cold"]["s"], 3)
    out["keys"] = keys
    out["paths"] = [str(p) for p in paths]
    return out


def measure_quantized(packets: list[KVPacket], root: Path, form: str, batch: int, repeats: int, model) -> dict:
    """Writes, warm reads and reads + assembly of ``packets`` in a LocalStore of one form."""
    store = LocalStore(root, quantization=form)
    start = time.perf_counter()
    keys = [store.put(p) for p in packets]
    write_s = time.perf_counter() - start
    total = store.stats()["bytes"]
    read_all(store, keys, batch)
    return {"bytes": total, "write": rate(write_s, total, len(keys)),
            "read_warm": rate(timed_passes(lambda: read_all(store, keys, batch), repeats), total, len(keys)),
            "read_assemble_warm": measure_assembly(store, keys, batch, repeats, model, total),
            "bytes_per_token": store.stats()["bytes_per_token"]}


def measure_assembly(store, keys: list[str], batch: int, repeats: int, model, total: int) -> dict:
    """Read ``batch`` packets at a time and assemble them into one reused buffer of the model's
    shape in the packets' dtype: what a question pays for its packets."""
    dtype = store.get(keys[0]).dtype
    shape = SimpleNamespace(num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                            dtype=dtype, device=torch.device("cpu"))
    buffer = KVBuffer(shape)

    def go() -> None:
        for group in batches(keys, batch):
            assemble(buffer, store.get_many(group), model.rope, reserve=64)

    go()
    return rate(timed_passes(go, repeats), total, len(keys))


def measure_redis(packets: list[KVPacket], urls: dict[str, str], batch: int, repeats: int, raw_warm_s: float) -> dict:
    """Writes and reads through `RedisStore` on each transport in ``urls``, each against a parser-free
    socket client on the same transport (the ceiling)."""
    from ..store.redis_store import RedisStore

    first = RedisStore(next(iter(urls.values())), prefix="bench:", socket_timeout=60)
    first.gc(max_bytes=0)  # a clean slate under the prefix
    data = [encode_packet(p) for p in packets]
    names = [first.prefix + p.key for p in packets]
    total = sum(len(d) for d in data)
    out: dict = {"bytes": total, "client": f"redis-py {redis_lib.__version__}, hiredis parser: "
                                           f"{bool(redis_lib.utils.HIREDIS_AVAILABLE)}"}
    for transport, url in urls.items():
        store = RedisStore(url, prefix="bench:", socket_timeout=60)
        first._client.delete(*names)
        start = time.perf_counter()
        keys = store.put_many(packets, batch=batch)
        put_s = time.perf_counter() - start
        with raw_socket(url) as sock:
            buffer = bytearray(max(len(d) for d in data) + 64)
            first._client.delete(*names)
            set_s = timed_passes(lambda: [resp_call(sock, buffer, b"SET", n.encode(), d) for n, d in zip(names, data)], 1)
            read_all(store, keys, batch)
            get_s = timed_passes(lambda: [resp_call(sock, buffer, b"GET", n.encode()) for n in names], repeats)
        many_s = timed_passes(lambda: read_all(store, keys, batch), repeats)
        out[transport] = {"write": rate(put_s, total, len(keys)), "plain_socket_set": rate(set_s, total, len(keys)),
                          "put_many_vs_plain_socket": round(set_s / put_s, 3),
                          "redis_get_many": rate(many_s, total, len(keys)),
                          "plain_socket_get": rate(get_s, total, len(keys)),
                          "get_many_vs_plain_socket": round(get_s / many_s, 3),
                          "get_many_vs_raw_file_read": round(raw_warm_s / many_s, 3)}
        store.close()
    first._client.delete(*names)
    first.close()
    return out


@contextmanager
def raw_socket(url: str):
    """A plain socket to the server at ``url`` (``redis://host:port`` or ``unix:///path``), authenticated if needed."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(parts.path)
    else:
        sock = socket.create_connection((parts.hostname, parts.port or 6379))
    try:
        if parts.password:
            resp_call(sock, bytearray(64), b"AUTH", *([parts.username.encode()] if parts.username else []),
                      parts.password.encode())
        yield sock
    finally:
        sock.close()


def sizes_of(client, names: list[str]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.strlen(name)
    return pipe.execute()


def resp_call(sock: socket.socket, buffer: bytearray, *args: bytes) -> int:
    """Send one RESP command and read its simple or bulk reply into ``buffer`` (the transport ceiling:
    no parser, no allocation). Returns the reply's payload size."""
    sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
    view, n = memoryview(buffer), 0
    while b"\r\n" not in bytes(view[: min(n, 32)]):
        n += sock.recv_into(view[n:], 32 if n < 32 else len(buffer) - n)
    head = bytes(view[: min(n, 32)])
    end = head.index(b"\r\n")
    if head[:1] != b"$":
        return 0
    total = end + 2 + int(head[1:end]) + 2
    while n < total:
        n += sock.recv_into(view[n:total])
    return total - end - 4


def measure_forms(real: list[KVPacket]) -> dict:
    """Bytes per token and reconstruction error (mean over the real packets) of each form."""
    out = {}
    for form in FORMS:
        sizes, errors = [], []
        for packet in real:
            if form == "bf16" or form == "fp32":
                dtype = torch.bfloat16 if form == "bf16" else torch.float32
                p = KVPacket(packet.keys.to(dtype), packet.values.to(dtype), packet.token_ids, packet.n_header,
                             packet.n_trailer, packet.model_fingerprint, packet.tokenizer_fingerprint,
                             packet.adapter_fingerprint)
                sizes.append(len(p.to_bytes()) / p.length)
                errors.append(reconstruction_error(p, "none") if form == "fp32" else _cast_error(packet, p))
            else:
                sizes.append(len(encode_packet(packet, form)) / packet.length)
                errors.append(reconstruction_error(packet, form))
        out[form] = {"bytes_per_token": round(median(sizes), 1),
                     **{k: float(f"{sum(e[k] for e in errors) / len(errors):.3g}") for k in errors[0]}}
    for form in FORMS:
        out[form]["vs_bf16"] = round(out[form]["bytes_per_token"] / out["bf16"]["bytes_per_token"], 4)
    return out


def _cast_error(exact: KVPacket, cast: KVPacket) -> dict:
    out = {}
    for name in ("keys", "values"):
        want = getattr(exact, name).float()
        diff = getattr(cast, name).float() - want
        out[f"{name}_max_abs"] = float(diff.abs().max())
        out[f"{name}_rel_rms"] = float(diff.pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
    return out


def start_redis(workdir: Path) -> tuple[subprocess.Popen | None, dict[str, str]]:
    """A private redis-server (no persistence, two I/O threads, reads included) on a free loopback
    port and a Unix socket; returns it and its URLs by transport (none when redis-server is absent)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None, {}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unix = workdir / "redis.sock"
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--unixsocket", str(unix), "--unixsocketperm", "700", *REDIS_SERVER_OPTIONS,
                                "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return process, {"tcp": f"redis://127.0.0.1:{port}/0", "unix": f"unix://{unix}"}
        except OSError:
            time.sleep(0.05)
    process.kill()
    return None, {}


# ---- report ---------------------------------------------------------------------------------


def table(result: dict) -> str:
    m, local, cfg = result["machine"], result["local"], result["config"]
    lines = [(f"Packet store, {cfg['packets']} packets × {cfg['tokens']} tokens of {result['model']} "
              f"({cfg['dtype']}, {local['bytes'] / cfg['packets'] / 1e6:.1f} MB each, {local['bytes'] / 1e9:.2f} GB), "
              f"get_many batches of {cfg['batch']}, {m['threads']} thread(s), {m['cpu']} ({m['cores']} cores), "
              f"{m['date']}"),
             f"command: `{m['command']}`", f"packets: {cfg['packet_source']}",
             (f"load average (1 min) at start / end: {result['load_average'][0]:.1f} / "
              f"{result['load_average'][1]:.1f}"),
             f"cold: {local['eviction']}; workdir filesystem: {cfg['workdir_filesystem']}", "",
             "| read path | GB/s (stored bytes) | packets/s | vs ceiling (same run) |", "|---|---|---|---|"]
    rows = [("raw file read, warm (ceiling)", local["raw_read_warm"], None),
            ("raw file read + xxh3, warm", local["raw_read_xxh3_warm"], None),
            ("LocalStore warm (mmap + checksum + key check)", local["local_warm"], f"{local['warm_local_vs_raw']:.0%} of warm raw"),
            ("raw file read, cold (ceiling)", local["raw_read_cold"], None),
            ("LocalStore cold", local["local_cold"], f"{local['cold_local_vs_raw']:.0%} of cold raw"),
            ("MemoryCache hits (no copy: returns cached tensors)", local["memory_cache_hits"], None)]
    for form, q in result["quantized"].items():
        rows.append((f"LocalStore {form} warm (codes stay quantized)", q["read_warm"], None))
    redis = result.get("redis") or {}
    for transport in (t for t in ("tcp", "unix", "given") if t in redis):
        r = redis[transport]
        rows += [(f"Redis GET, {transport}, plain socket, no parser (ceiling)", r["plain_socket_get"], None),
                 (f"RedisStore.get_many, {transport}", r["redis_get_many"],
                  f"{r['get_many_vs_plain_socket']:.0%} of plain socket; {r['get_many_vs_raw_file_read']:.0%} of warm raw")]
    for name, r, vs in rows:
        gbps = "n/a" if name.startswith("MemoryCache") else f"{r['GB_per_s']:.2f}"
        lines.append(f"| {name} | {gbps} | {r['packets_per_s']:.0f} | {vs or ''} |")
    bf16 = local["local_assemble_warm"]["packets_per_s"]
    lines += ["", f"Question path: read + assembly (decode, rotate, copy) into a reused {cfg['dtype']} buffer of the "
              "model's shape, warm LocalStore:", "",
              "| form | packets/s | vs bf16 (same run) |", "|---|---|---|",
              f"| {cfg['dtype']} (mapped file → rotate → buffer) | {bf16:.0f} | 100% |"]
    for form, q in result["quantized"].items():
        rate_ = q["read_assemble_warm"]["packets_per_s"]
        lines.append(f"| {form} (mapped codes → dequantize → rotate → buffer) | {rate_:.0f} | {rate_ / bf16:.0%} |")
    lines += ["", "| write path | GB/s | packets/s | vs ceiling (same run) |", "|---|---|---|---|",
              f"| LocalStore put (encode, write, fsync, rename, index) | {local['write']['GB_per_s']:.2f} | "
              f"{local['write']['packets_per_s']:.0f} | |"]
    for transport in (t for t in ("tcp", "unix", "given") if t in redis):
        r = redis[transport]
        lines += [f"| Redis SET, {transport}, plain socket, bytes ready (ceiling) | {r['plain_socket_set']['GB_per_s']:.2f} | "
                  f"{r['plain_socket_set']['packets_per_s']:.0f} | |",
                  f"| RedisStore put_many, {transport} (encode + seal + SET NX, pipelined) | {r['write']['GB_per_s']:.2f} | "
                  f"{r['write']['packets_per_s']:.0f} | {r['put_many_vs_plain_socket']:.0%} of plain socket |"]
    for form, q in result["quantized"].items():
        lines.append(f"| LocalStore {form} put (quantize + write) | {q['write']['GB_per_s']:.2f} | "
                     f"{q['write']['packets_per_s']:.0f} | |")
    lines += ["", f"Sizes and reconstruction error (mean over {cfg['real']} real packets, from fp32):", "",
              "| form | bytes/token | vs bf16 | keys rel. RMS err | keys max abs err | values rel. RMS err | values max abs err |",
              "|---|---|---|---|---|---|---|"]
    for form, f in result["forms"].items():
        lines.append(f"| {form} | {f['bytes_per_token']:.0f} | {f['vs_bf16']:.1%} | {f['keys_rel_rms']:.2e} | "
                     f"{f['keys_max_abs']:.3g} | {f['values_rel_rms']:.2e} | {f['values_max_abs']:.3g} |")
    lines += ["", f"Redis: {cfg.get('redis_server', 'not measured')}; {redis.get('client', 'no redis-server')}. "
              f"Peak RSS {result['peak_rss_mb']:.0f} MiB."]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    tune_malloc()
    threads = set_threads(args.threads)
    load_start = os.getloadavg()[0]
    dtype = getattr(torch, args.dtype)
    real, model = real_packets(args.real, args.tokens)
    packets = replicas(real[0], args.packets, dtype)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kvpacket-bench-store-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    redis_process = None
    try:
        local = measure_local(packets, work / "local", args.batch, args.repeats, model)
        quantized = {form: measure_quantized(packets[: args.quantized_packets], work / f"local-{form}", form,
                                             args.batch, args.repeats, model) for form in ("int8", "int4")}
        if args.redis_url:
            urls = {"given": args.redis_url}
        else:
            redis_process, urls = start_redis(work)
        redis = measure_redis(packets, urls, args.batch, args.repeats, local["raw_read_warm"]["s"]) if urls else None
        forms = measure_forms(real)
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(timeout=30)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    local.pop("keys")
    local.pop("paths")
    result = {"model": model.name, "machine": machine_info(threads),
              "config": {"packets": args.packets, "tokens": args.tokens, "dtype": args.dtype, "batch": args.batch,
                         "repeats": args.repeats, "real": args.real, "quantized_packets": args.quantized_packets,
                         "workdir_filesystem": _filesystem(work.parent),
                         "redis_server": "given URL" if args.redis_url else
                         f"redis-server {' '.join(REDIS_SERVER_OPTIONS)}, loopback TCP and a Unix socket",
                         "packet_source": f"{args.real} real bare packets of {model.name} built from NIAH essay text "
                                          f"({args.tokens} tokens); the throughput set reuses the first one's tensors "
                                          f"in {args.dtype} with distinct token ids ({args.packets} distinct keys)"},
              "local": local, "quantized": quantized, "redis": redis, "forms": forms, "peak_rss_mb": peak_rss_mb(),
              "load_average": [load_start, os.getloadavg()[0]]}
    write_outputs(result, table(result), args.json)
    return result


def _filesystem(path: Path) -> str:
    out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=False).stdout.splitlines()
    return " ".join(out[-1].split()[:2]) if len(out) > 1 else "unknown"


if __name__ == "__main__":
    import sys

    sys.argv[0] = "python -m kvpacket_rag.benchmarks.store"  # recorded as the exact command
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())
