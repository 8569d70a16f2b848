"""What every persistent store shares: entry names, header summaries, checked decoding."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import CorruptPacketError
from ..packet import KVPacket, read_header
from ..quantize import QUANTIZATIONS, check_quantization
from .base import validate_key

_ENTRY = re.compile(r"([0-9a-f]{64})(?:\.(int8|int4))?")


def entry_name(key: str, quantization: str) -> str:
    """Storage name of a packet in a form: the key, plus ``.int8`` / ``.int4`` when quantized.

    A store keeps each (packet key, quantization) pair as its own entry, so an int8 copy is never
    returned to a caller that asked for the exact packet, and the reverse.
    """
    validate_key(key)
    return key if check_quantization(quantization) == "none" else f"{key}.{quantization}"


def parse_entry_name(name: str) -> tuple[str, str] | None:
    """``(key, quantization)`` of a storage name, or None when ``name`` is not one."""
    match = _ENTRY.fullmatch(name)
    return (match.group(1), match.group(2) or "none") if match else None


@dataclass(frozen=True)
class EntryInfo:
    """What a stored file's header says about its packet (read without touching the tensor bytes)."""

    key: str
    quantization: str
    size: int
    checksum: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    adapter_fingerprint: str
    dtype: str
    tokens: int
    positions: int


def header_info(key: str, quantization: str, buffer, size: int | None = None) -> EntryInfo:
    """Summary of the ``kvpacket/1`` header at the start of ``buffer`` (the whole file or its first bytes).

    ``checksum`` is the file's seal: its ``digest`` (header and tensors) or, for files written
    before the digest, the tensor ``checksum``.

    Raises:
        CorruptPacketError: not a kvpacket/1 header, or one that lacks or mistypes a field.
    """
    try:
        meta, specs, _ = read_header(buffer)
    except CorruptPacketError as error:
        raise CorruptPacketError(f"entry {key[:12]}: {error}") from None
    seal = meta.get("digest", meta.get("checksum"))
    tokens, keys = specs.get("token_ids"), specs.get("keys")
    fields = ("quantization", "model_fingerprint", "tokenizer_fingerprint", "adapter_fingerprint", "dtype")
    missing = [f for f in fields if f not in meta] + ([] if seal else ["digest"])
    if missing or tokens is None or keys is None or len(tokens.shape) != 1 or len(keys.shape) != 4:
        raise CorruptPacketError(f"entry {key[:12]} has an incomplete header (lacks {', '.join(missing) or 'tensors'}); "
                                 "it was damaged")
    return EntryInfo(key, meta["quantization"], size if size is not None else len(memoryview(buffer)), seal,
                     meta["model_fingerprint"], meta["tokenizer_fingerprint"], meta["adapter_fingerprint"],
                     meta["dtype"], tokens.shape[0], keys.shape[2])


def decode_entry(buffer, key: str, quantization: str, signing_key: bytes | None = None) -> KVPacket:
    """Decode and fully check a stored entry: digest (and signature), quantization and content address.

    A file whose digest holds but whose packet has another key (another model, tokenizer,
    adapter, dtype or chunk) is refused: a store never returns a packet under a foreign key.

    Raises:
        CorruptPacketError: damaged bytes, or a packet that is not the one ``key`` names.
        UntrustedPacketError: ``signing_key`` given and the entry is unsigned or signed with another key.
    """
    info = header_info(key, quantization, buffer)
    if info.quantization != quantization:
        raise CorruptPacketError(f"entry {key[:12]} holds a {info.quantization[:8]} packet where {quantization} was stored")
    packet = KVPacket.from_bytes(buffer, verify=True, signing_key=signing_key)
    if packet.key != key:
        raise CorruptPacketError(
            f"entry {key[:12]} holds the packet {packet.key[:12]} (another model, tokenizer, adapter or chunk); "
            "it was moved aside"
        )
    return packet


def summarize(rows: list[tuple[str, int, int]]) -> dict:
    """Totals over ``(quantization, bytes, positions)`` rows: packets, bytes, positions, bytes/token per form."""
    forms: dict[str, dict] = {}
    for quantization, size, positions in rows:
        form = forms.setdefault(quantization, {"packets": 0, "bytes": 0, "positions": 0})
        form["packets"] += 1
        form["bytes"] += size
        form["positions"] += positions
    for form in forms.values():
        form["bytes_per_token"] = round(form["bytes"] / form["positions"], 2) if form["positions"] else None
    total_bytes = sum(f["bytes"] for f in forms.values())
    total_positions = sum(f["positions"] for f in forms.values())
    return {"packets": sum(f["packets"] for f in forms.values()), "bytes": total_bytes, "positions": total_positions,
            "bytes_per_token": round(total_bytes / total_positions, 2) if total_positions else None,
            "by_quantization": {q: forms[q] for q in QUANTIZATIONS if q in forms}}
