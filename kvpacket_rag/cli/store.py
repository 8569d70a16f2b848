"""`kvpacket store stats|verify|gc|rm --store PATH_OR_URL`: inspect and maintain a packet store."""

from __future__ import annotations

import argparse
import json
import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_bytes(text: str) -> int:
    """``512M``, ``2G``, ``1.5T`` or a plain byte count (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500M, 2G, 1073741824)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 90s, 12h, 7d)")
    return float(match.group(1)) * _DURATIONS[match.group(2) or "s"]


def register(subparsers) -> None:
    store = subparsers.add_parser("store", help="inspect and maintain a packet store (directory or redis:// URL)")
    actions = store.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text)
        parser.add_argument("--store", required=True, help="store directory or redis:// URL")
        parser.add_argument("--prefix", default=None, help="Redis key prefix (default: kvpacket:)")
        parser.set_defaults(handler=handler)
        return parser

    stats = action("stats", "packets, bytes, bytes per token, counters", run_stats)
    stats.add_argument("--json", action="store_true", help="print the stats as JSON")
    verify = action("verify", "re-check every digest, header and fingerprint; list all bad entries (exit 1 if any)",
                    run_verify)
    verify.add_argument("--quarantine", action="store_true",
                        help="move bad entries aside (and index complete files that lack an entry)")
    gc = action("gc", "remove entries by age, size budget or foreign model/adapter; clean leftovers", run_gc)
    gc.add_argument("--max-age", type=parse_duration, default=None, help="remove entries unused for this long (e.g. 7d)")
    gc.add_argument("--max-bytes", type=parse_bytes, default=None,
                    help="then remove least recently used entries down to this size (e.g. 20G)")
    gc.add_argument("--model", default=None,
                    help="keep only packets of this model (Hugging Face id/directory, or 'default'); loads it")
    gc.add_argument("--adapter", default="default",
                    help="with --model: the adapter whose packets to keep besides bare and exact ones ('default', a "
                         "file, 'none'), those built after neighbour contexts included")
    gc.add_argument("--model-fingerprint", default=None, help="keep only packets with this model fingerprint")
    gc.add_argument("--adapter-fingerprint", action="append", default=None,
                    help="keep only packets with this adapter fingerprint (repeatable; 'none' = bare packets; "
                         "its packets built after neighbour contexts are kept too)")
    gc.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    rm = action("rm", "remove packets by key", run_rm)
    rm.add_argument("keys", nargs="+", help="packet keys (64 hex characters)")
    rm.add_argument("--quantization", default=None, help="form to remove: none, int8, int4 (default: every form)")


def _open(args):
    """The existing store named by ``--store`` (never creates one: a typo is an error)."""
    from ..store import open_store

    redis = args.store.startswith(("redis://", "rediss://", "unix://"))
    if args.prefix is not None and not redis:
        raise ValueError("--prefix applies to Redis stores only")
    options = {"prefix": args.prefix} if args.prefix is not None else {}
    return open_store(args.store, **options) if redis else open_store(args.store, create=False)


def run_stats(args) -> int:
    store = _open(args)
    stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{stats['backend']} store {stats['location']}")
    print(f"  packets {stats['packets']}, {_human(stats['bytes'])}, {stats['positions']} positions, "
          f"{stats['bytes_per_token']} bytes/token")
    for form, totals in stats["by_quantization"].items():
        print(f"  {form:>5}: {totals['packets']} packets, {_human(totals['bytes'])}, {totals['bytes_per_token']} bytes/token")
    skip = {"backend", "location", "packets", "bytes", "positions", "bytes_per_token", "by_quantization"}
    print("  " + ", ".join(f"{k} {v}" for k, v in stats.items() if k not in skip))
    return 0


def run_verify(args) -> int:
    store = _open(args)
    bad = store.verify(quarantine=args.quarantine)
    for entry in bad:
        print(f"{entry.key} {entry.quantization}: {entry.reason} [{entry.action}]")
    checked = store.stats()["packets"]
    print(f"{len(bad)} bad entries; {checked} packets indexed after the check")
    return 1 if bad else 0


def run_gc(args) -> int:
    keep_model, keep_tokenizer, keep_adapters = args.model_fingerprint, None, args.adapter_fingerprint
    if args.model is not None:
        keep_model, keep_tokenizer, keep_adapters = _fingerprints(args.model, args.adapter)
    store = _open(args)
    result = store.gc(max_age_s=args.max_age, max_bytes=args.max_bytes, keep_model=keep_model,
                      keep_adapters=keep_adapters, keep_tokenizer=keep_tokenizer, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {result['removed']} entries ({_human(result['bytes'])}), {result['temp_files']} stale temp files, "
          f"{result['quarantined_files']} quarantined files")
    return 0


def run_rm(args) -> int:
    from ..quantize import QUANTIZATIONS

    store = _open(args)
    forms = QUANTIZATIONS if args.quantization is None else (args.quantization,)
    missing = 0
    for key in args.keys:
        removed = [form for form in forms if store.delete(key, quantization=form)]
        print(f"{key}: {'removed ' + ', '.join(removed) if removed else 'not stored'}")
        missing += not removed
    return 1 if missing else 0


def _fingerprints(model_name: str, adapter: str) -> tuple[str, str, list[str]]:
    """Model, tokenizer and packet-provenance fingerprints to keep: packets of the given adapter, bare packets and
    exact packets (bare, built after the chat preamble: the first chunk of ``kv_packet_first_exact``), as an engine
    with the default system prompt builds them."""
    from ..engine import PacketEngine
    from ..models import load_model
    from ..store import InMemoryStore

    model = load_model(None if model_name == "default" else model_name)
    engine = PacketEngine(model, adapter=None if adapter == "none" else adapter, store=InMemoryStore())
    builders = (engine.bare_builder, engine.exact_builder, engine.builder)
    return model.fingerprint, model.tokenizer_fingerprint, list(dict.fromkeys(b.adapter_fingerprint for b in builders))


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
