"""LocalStore: packets as files in one directory, indexed by SQLite, shared by many processes.

Layout of a store directory::

    kvpacket-store.json        marker: {"format": "kvpacket-store/1"}
    index.sqlite               key, quantization -> size, checksum (the file's digest), fingerprints, dtype, tokens,
                               positions, created, last_used (WAL mode: many readers, one writer)
    packets/ab/<key>[.int8|.int4].kvp   kvpacket/1 files, fanned out by the key's first two hex digits
    tmp/                       files being written (renamed into packets/ when complete)
    quarantine/                damaged files moved aside by reads, `verify` or `gc`

Writes go to ``tmp/``, are fsynced and renamed into place (then the directory is fsynced), so a
reader never sees a partial file and a killed writer leaves at most a stale temp file. The rename
and the index row change under the index's write lock, as do a delete's row and unlink, so a `put`
racing an `rm` leaves both or neither. Reads map the file (no copy for plain packets), verify its
digest (and signature, with a signing key) and content address, and move damaged entries to
``quarantine/`` without touching any other entry; a file removed between lookup and open is a miss.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import CorruptPacketError, PacketNotFoundError
from ..fileio import fsync_dir
from ..packet import KVPacket, encode_packet
from ..quantize import check_quantization
from .base import BadEntry, PersistentStore, StoreError, check_form, resolve_signing_key, validate_key
from .entries import EntryInfo, decode_entry, entry_name, header_info, parse_entry_name, summarize

log = logging.getLogger(__name__)

STORE_FORMAT = "kvpacket-store/1"
MARKER = "kvpacket-store.json"
TOUCH_AFTER_S = 60.0  # last_used is refreshed at most this often per entry (reads stay write-free)
STALE_TEMP_S = 3600.0  # gc removes temp files this old even when their writer's pid looks alive

_COLUMNS = ("key", "quantization", "size", "checksum", "model_fingerprint", "tokenizer_fingerprint",
            "adapter_fingerprint", "dtype", "tokens", "positions", "created", "last_used")
_SCHEMA = """CREATE TABLE IF NOT EXISTS packets (
    key TEXT NOT NULL, quantization TEXT NOT NULL, size INTEGER NOT NULL, checksum TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL, tokenizer_fingerprint TEXT NOT NULL, adapter_fingerprint TEXT NOT NULL,
    dtype TEXT NOT NULL, tokens INTEGER NOT NULL, positions INTEGER NOT NULL,
    created REAL NOT NULL, last_used REAL NOT NULL,
    PRIMARY KEY (key, quantization)) WITHOUT ROWID"""
_INSERT = f"INSERT OR REPLACE INTO packets ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class _Vanished(Exception):
    """The entry's file disappeared (removed by `delete` or `gc` in another thread or process)."""


class _Damaged(CorruptPacketError):
    """A damaged file, with the inode that was read (so only that file is quarantined)."""

    def __init__(self, message: str, inode: int | None, kind: type[CorruptPacketError] = CorruptPacketError):
        super().__init__(message)
        self.inode = inode
        self.kind = kind  # the error to raise: CorruptPacketError or UntrustedPacketError


class LocalStore(PersistentStore):
    """Packets in a local directory: atomic writes, checksummed zero-copy reads, safe for many processes.

    Args:
        path: the store directory (created if missing; an existing non-empty directory must
            already be a store).
        quantization: the form `put` writes and `get` reads when a call does not say
            (``none``, ``int8`` or ``int4``). Each form is its own entry under the same packet key:
            an int8 store quantizes on `put`, dequantizes on `get` and returns packets whose ``key``
            is the unquantized packet's key, so the engine's lookups need no change.
        on_corrupt: ``raise`` (default): a damaged entry raises `CorruptPacketError` after it is
            quarantined; ``miss``: it is quarantined and reported as missing, so the engine rebuilds it.
        busy_timeout_s: how long to wait for another process's index write.
        signing_key: sign every packet written and refuse unsigned or wrongly signed ones
            (default: the ``KVPACKET_STORE_KEY`` environment variable; ``""`` turns it off).
        create: create the store when ``path`` holds none (False: raise instead, for tools that
            only inspect an existing store).

    Raises:
        StoreError: ``path`` is a file or a non-store directory, holds no store and ``create`` is
            False, or cannot be created; its index cannot be opened.
        ValueError: a bad option (unknown quantization or ``on_corrupt``, a short signing key).

    Example:
        >>> store = LocalStore("~/.cache/kvpacket/packets", quantization="int8")
        >>> engine = PacketEngine(store=store)
    """

    def __init__(self, path: str | os.PathLike, quantization: str = "none", on_corrupt: str = "raise",
                 busy_timeout_s: float = 30.0, signing_key: str | bytes | None = None, create: bool = True):
        if on_corrupt not in ("raise", "miss"):
            raise ValueError(f"on_corrupt must be 'raise' or 'miss', got {on_corrupt!r}")
        self.root = Path(path).expanduser()
        self.quantization = check_quantization(quantization)
        self.on_corrupt = on_corrupt
        self._signing_key = resolve_signing_key(signing_key)
        self.counters = {"puts": 0, "hits": 0, "misses": 0, "corrupt": 0}
        self._lock = threading.RLock()
        if not create and not (self.root / MARKER).is_file():
            raise StoreError(f"no packet store at {self.root}; check the path (a store is created by "
                             f"`kvpacket build --store {self.root}`)")
        self.read_only = not self._prepare()
        self._db = self._connect(busy_timeout_s)

    # ---- opening ---------------------------------------------------------------------------

    def _prepare(self) -> bool:
        """Create or check the directory layout; return whether it is writable."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise StoreError(f"packet store path {root} is a file; pass a directory")
        if root.is_dir() and not _is_store_dir(root):
            raise StoreError(f"{root} is not a packet store (no {MARKER}); pass a new or empty directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create packet store {root}: {error.strerror}; pass a writable path") from None
        if not os.access(root, os.W_OK | os.X_OK):
            if not (root / MARKER).is_file():
                raise StoreError(f"cannot create packet store in read-only directory {root}")
            return False
        for sub in ("packets", "tmp", "quarantine"):
            (root / sub).mkdir(exist_ok=True)
        if not (root / MARKER).is_file():
            self._write_atomic(root / MARKER, json.dumps({"format": STORE_FORMAT}).encode(), "the store marker")
        return True

    def _connect(self, busy_timeout_s: float) -> sqlite3.Connection:
        index = self.root / "index.sqlite"
        try:
            if not self.read_only:
                db = sqlite3.connect(index, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(_SCHEMA)
                return db
            return self._connect_read_only(index, busy_timeout_s)
        except sqlite3.DatabaseError as error:
            raise StoreError(f"cannot open the index of packet store {self.root}: {error}; if it is damaged, move "
                             "index.sqlite aside and run `kvpacket store verify --quarantine` to re-index the "
                             "packet files") from None

    def _connect_read_only(self, index: Path, busy_timeout_s: float) -> sqlite3.Connection:
        """The index opened read-only (never ``immutable``: a writer with other permissions may still
        change it); when SQLite cannot open it so (no WAL files and no right to create them), an
        in-memory index built from the packet files' headers, which are authoritative."""
        if index.is_file():
            uri = f"{index.resolve().as_uri()}?mode=ro"
            db = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
            try:
                db.execute("SELECT count(*) FROM packets").fetchone()
                return db
            except sqlite3.OperationalError as error:
                db.close()
                log.info("read-only packet store %s: index not readable in place (%s); indexing the files", self.root,
                         error)
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        db.execute(_SCHEMA)
        for path in sorted((self.root / "packets").glob("*/*.kvp")):
            parsed = parse_entry_name(path.stem)
            with suppress(_Vanished, _Damaged, OSError):  # a damaged file is reported when it is read
                if parsed is not None:
                    db.execute(_INSERT, _row(self._info(*parsed), path.stat().st_mtime))
        return db

    def close(self) -> None:
        """Close the index connection (packets already returned stay valid)."""
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r}, quantization={self.quantization!r})"

    # ---- reading ---------------------------------------------------------------------------

    def path_of(self, key: str, quantization: str | None = None) -> Path:
        """Where the entry's file lives (whether or not it exists)."""
        return self.root / "packets" / key[:2] / f"{entry_name(key, self._form(quantization))}.kvp"

    def get(self, key: str, *, quantization: str | None = None) -> KVPacket:
        """The packet stored under ``key`` in the given form (default: the store's).

        Raises:
            PacketNotFoundError: not stored (or damaged, with ``on_corrupt="miss"``).
            CorruptPacketError: damaged (truncated, altered, foreign or missing file); it was quarantined.
        """
        packet = self.get_many([key], quantization=quantization)[0]
        if packet is None:
            raise PacketNotFoundError(f"packet {key[:12]}… is not in {self.root}; build it first")
        return packet

    def get_many(self, keys: Sequence[str], *, quantization: str | None = None) -> list[KVPacket | None]:
        """Packets for ``keys`` in order, None where missing: one index query, one file map per packet."""
        form = self._form(quantization)
        for key in keys:
            validate_key(key)
        rows = self._rows(keys, form)
        out: list[KVPacket | None] = []
        stale: list[str] = []
        now = time.time()
        for key in keys:
            row = rows.get(key)
            try:
                packet = self._read(key, form, row[0]) if row else self._adopt(key, form)
            except _Vanished:  # removed since the index lookup: a miss, not damage
                self._forget(key, form)
                packet = None
            except _Damaged as damage:
                self._quarantine(key, form, str(damage), damage.inode, indexed=row is not None)
                if self.on_corrupt == "raise":
                    raise damage.kind(
                        f"packet {key[:12]}… in {self.root} is damaged ({damage}); it was moved to quarantine/, "
                        "so the next lookup misses and rebuilds it"
                    ) from None
                packet = None
            out.append(packet)
            if row and packet is not None and now - row[1] > TOUCH_AFTER_S:
                stale.append(key)
        hits = sum(p is not None for p in out)
        with self._lock:
            self.counters["hits"] += hits
            self.counters["misses"] += len(out) - hits
        self._touch(stale, form, now)
        return out

    def _read(self, key: str, form: str, size: int | None) -> KVPacket:
        path = self.path_of(key, form)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _Vanished() from None
        except OSError as error:
            raise StoreError(f"cannot read {path}: {error.strerror}") from None
        try:
            stat = os.fstat(fd)
            if size is not None and stat.st_size != size:
                raise _Damaged(f"file has {stat.st_size} bytes, the index recorded {size}", stat.st_ino)
            if stat.st_size == 0:
                raise _Damaged("file is empty", stat.st_ino)
            mapped = mmap.mmap(fd, stat.st_size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            return decode_entry(memoryview(mapped), key, form, self._signing_key)
        except CorruptPacketError as error:
            raise _Damaged(str(error), stat.st_ino, type(error)) from None

    def _adopt(self, key: str, form: str) -> KVPacket | None:
        """Index a complete file that has no index entry (its writer died between rename and index)."""
        try:
            packet, info = self._read(key, form, None), self._info(key, form)
        except _Vanished:
            return None
        if not self.read_only:
            with suppress(StoreError), self._transaction():  # unless a concurrent `delete` removed it meanwhile
                if self.path_of(key, form).exists():
                    self._insert(info)
        return packet

    def _info(self, key: str, form: str) -> EntryInfo:
        try:
            return header_info(key, form, memoryview(_map(self.path_of(key, form))))
        except FileNotFoundError:
            raise _Vanished() from None
        except (OSError, ValueError) as error:  # ValueError: mmap of an empty file
            raise _Damaged(f"cannot map its file: {error}", None) from None
        except CorruptPacketError as error:
            raise _Damaged(str(error), None) from None

    def _forget(self, key: str, form: str) -> None:
        """Drop the index entry of a file that is gone (unless a writer brought it back meanwhile)."""
        if self.read_only:
            return
        with suppress(StoreError), self._transaction():
            if not self.path_of(key, form).exists():
                self._delete_row(key, form)

    def _rows(self, keys: Sequence[str], form: str) -> dict[str, tuple[int, float]]:
        rows: dict[str, tuple[int, float]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            batch = unique[start : start + 500]
            marks = ",".join("?" * len(batch))
            query = f"SELECT key, size, last_used FROM packets WHERE quantization = ? AND key IN ({marks})"
            for key, size, last_used in self._query(query, (form, *batch)):
                rows[key] = (size, last_used)
        return rows

    def _touch(self, keys: list[str], form: str, now: float) -> None:
        if not keys or self.read_only:
            return
        with suppress(sqlite3.DatabaseError), self._lock:  # a busy or read-only index only loses recency
            self._db.executemany("UPDATE packets SET last_used = ? WHERE key = ? AND quantization = ?",
                                 [(now, key, form) for key in keys])

    # ---- writing ---------------------------------------------------------------------------

    def put(self, packet: KVPacket, *, quantization: str | None = None) -> str:
        """Store ``packet`` in the given form (default: the store's); a no-op if that entry exists.

        Raises:
            StoreError: read-only directory, disk full or index unwritable; nothing visible changed.
            ValueError: unknown quantization or an already quantized packet.
        """
        form = self._form(quantization)
        key = packet.key
        path = self.path_of(key, form)
        if self._rows([key], form) and path.is_file():
            return key
        if self.read_only:
            raise StoreError(f"packet store {self.root} is read-only; open a writable directory to add packets")
        data = encode_packet(packet, form, self._signing_key)
        info = header_info(key, form, data)
        tmp = self._write_temp(path, data, f"packet {key[:12]}")
        try:
            with self._transaction():  # rename and index row together: a concurrent `delete` sees both or neither
                self._publish(tmp, path, f"packet {key[:12]}", len(data))
                self._insert(info)
        finally:
            with suppress(OSError):
                tmp.unlink()
        with self._lock:
            self.counters["puts"] += 1
        return key

    def _write_atomic(self, path: Path, data: bytes, what: str) -> None:
        self._publish(self._write_temp(path, data, what), path, what, len(data))

    def _write_temp(self, path: Path, data: bytes, what: str) -> Path:
        """Write ``data`` to a fresh, fsynced temp file (in ``tmp/``) and return its path."""
        tmp = self.root / "tmp" / f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        if not tmp.parent.is_dir():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            with suppress(OSError):
                tmp.unlink()
            raise self._write_error(what, len(data), error) from None
        return tmp

    def _publish(self, tmp: Path, path: Path, what: str, size: int) -> None:
        """Rename the complete temp file into place and fsync its directory."""
        try:
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as error:
            with suppress(OSError):
                tmp.unlink()
            raise self._write_error(what, size, error) from None

    @contextmanager
    def _transaction(self):
        """Hold the index's write lock (BEGIN IMMEDIATE) for the block: file and row change together.

        Raises:
            StoreError: another process held the lock past ``busy_timeout_s``, or the index is damaged.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as error:
                raise StoreError(f"cannot lock the index of {self.root}: {error}; another process holds it "
                                 "(raise busy_timeout_s) or the index is damaged") from None
            try:
                yield
            except BaseException:
                with suppress(sqlite3.DatabaseError):
                    self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as error:
                with suppress(sqlite3.DatabaseError):
                    self._db.execute("ROLLBACK")
                raise StoreError(f"cannot update the index of {self.root}: {error}; the packet file is complete "
                                 "and will be indexed on its next read") from None

    def _write_error(self, what: str, size: int, error: OSError) -> StoreError:
        if error.errno in _NO_SPACE:
            return StoreError(f"no space to write {what} ({size} bytes) in {self.root}: {error.strerror}; nothing was "
                              f"changed. Free disk space or run `kvpacket store gc --store {self.root} --max-bytes ...`")
        if error.errno in _READ_ONLY:
            return StoreError(f"cannot write {what} to {self.root}: {error.strerror} (read-only directory?); "
                              "nothing was changed. Open a writable directory or fix its permissions")
        return StoreError(f"cannot write {what} to {self.root}: {error}")

    def _insert(self, info: EntryInfo) -> None:
        try:
            with self._lock:
                self._db.execute(_INSERT, _row(info, time.time()))
        except sqlite3.DatabaseError as error:
            raise StoreError(f"cannot update the index of {self.root}: {error}; the packet file is complete and "
                             "will be indexed on its next read") from None

    def delete(self, key: str, *, quantization: str | None = None) -> bool:
        """Remove the entry; True if it was there."""
        form = self._form(quantization)
        validate_key(key)
        if self.read_only:
            raise StoreError(f"packet store {self.root} is read-only; cannot delete")
        with self._transaction():  # row and file go together: a concurrent `put` sees both or neither
            existed = self._delete_row(key, form)
            try:
                self.path_of(key, form).unlink()
                existed = True
            except FileNotFoundError:
                pass
        return existed

    def _delete_row(self, key: str, form: str) -> bool:
        try:
            with self._lock:
                cursor = self._db.execute("DELETE FROM packets WHERE key = ? AND quantization = ?", (key, form))
        except sqlite3.DatabaseError as error:
            raise StoreError(f"cannot update the index of {self.root}: {error}") from None
        return cursor.rowcount > 0

    def _quarantine(self, key: str, form: str, reason: str, inode: int | None, indexed: bool) -> None:
        """Move the damaged file (if it is still the one read) aside and drop its index entry."""
        with self._lock:
            self.counters["corrupt"] += 1
        log.warning("packet %s (%s) in %s is damaged: %s; quarantined", key[:12], form, self.root, reason)
        if self.read_only:
            return
        path = self.path_of(key, form)
        with suppress(OSError):
            if inode is not None and os.stat(path).st_ino == inode:
                target = self.root / "quarantine" / f"{path.stem}.{time.time_ns()}.kvp"
                os.replace(path, target)
                target.with_suffix(".reason").write_text(reason + "\n")
        if indexed:
            with suppress(StoreError):
                self._delete_row(key, form)

    # ---- listing, stats, maintenance ------------------------------------------------------

    def contains(self, key: str, *, quantization: str | None = None) -> bool:
        form = self._form(quantization)
        return bool(self._rows([validate_key(key)], form))

    def keys(self, *, quantization: str | None = None) -> Iterator[str]:
        """Keys stored in the given form (default: the store's), sorted."""
        form = self._form(quantization)
        return iter([row[0] for row in self._query("SELECT key FROM packets WHERE quantization = ? ORDER BY key", (form,))])

    def entries(self) -> list[dict]:
        """Every index entry of every form, as dicts of the index columns plus ``idle_s``."""
        now = time.time()
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM packets ORDER BY key")
        return [{**entry, "idle_s": max(0.0, now - entry["last_used"])} for entry in (dict(zip(_COLUMNS, r)) for r in rows)]

    def stats(self) -> dict:
        """Packets, bytes, positions and bytes per token (total and per quantization), counters, state."""
        rows = self._query("SELECT quantization, size, positions FROM packets")
        models = self._query("SELECT count(DISTINCT model_fingerprint || adapter_fingerprint) FROM packets")[0][0]
        quarantined = len(list((self.root / "quarantine").glob("*.kvp")))
        temp = len(list((self.root / "tmp").glob("*.tmp")))
        with self._lock:
            counters = dict(self.counters)
        return {"backend": "local", "location": str(self.root), "quantization": self.quantization,
                **summarize(rows), "model_adapter_pairs": models, "quarantined_files": quarantined,
                "temp_files": temp, "read_only": self.read_only, "signed": self._signing_key is not None, **counters}

    def verify(self, quarantine: bool = False) -> list[BadEntry]:
        """Re-check every entry's checksum, header and fingerprints against the index, and look for
        files without an entry. With ``quarantine``, damaged entries are moved aside and valid
        unindexed files are indexed; otherwise nothing changes."""
        bad: list[BadEntry] = []
        indexed = set()
        for entry in self.entries():
            key, form = entry["key"], entry["quantization"]
            indexed.add(self.path_of(key, form).name)
            try:
                problem, inode = self._check(entry)
            except _Vanished:
                if not self._rows([key], form):
                    continue  # deleted meanwhile by another process
                problem, inode = "its file is missing", None
            if problem:
                action = "reported"
                if quarantine and not self.read_only:
                    self._quarantine(key, form, problem, inode, indexed=True)
                    action = "quarantined"
                bad.append(BadEntry(key, form, problem, action))
        for path in sorted((self.root / "packets").glob("*/*.kvp")):
            parsed = parse_entry_name(path.stem)
            if path.name in indexed or parsed is None:
                continue
            key, form = parsed
            action = "reported"
            if quarantine and not self.read_only:
                try:
                    action = "indexed" if self._adopt(key, form) is not None else "gone"
                except _Damaged as damage:
                    self._quarantine(key, form, str(damage), damage.inode, indexed=False)
                    action = "quarantined"
            bad.append(BadEntry(key, form, "file without an index entry", action))
        return bad

    def _check(self, entry: dict) -> tuple[str | None, int | None]:
        key, form = entry["key"], entry["quantization"]
        try:
            self._read(key, form, entry["size"])
            info = self._info(key, form)
        except _Damaged as damage:
            return str(damage), damage.inode
        except (OSError, CorruptPacketError, StoreError) as error:
            return str(error), None
        for field in ("checksum", "model_fingerprint", "tokenizer_fingerprint", "adapter_fingerprint", "dtype"):
            if getattr(info, field) != entry[field]:
                return f"file {field} differs from the index", None
        return None, None

    def _collect(self, doomed: list[dict], dry_run: bool) -> dict:
        """Delete the doomed entries, stale temp files (writer gone or older than an hour) and quarantined files."""
        if self.read_only and not dry_run:
            raise StoreError(f"packet store {self.root} is read-only; cannot gc")
        now = time.time()
        temp = [p for p in (self.root / "tmp").glob("*.tmp") if _stale_temp(p, now)]
        quarantined = list((self.root / "quarantine").iterdir())
        if not dry_run:
            for entry in doomed:
                self.delete(entry["key"], quantization=entry["quantization"])
            for path in temp + quarantined:
                with suppress(FileNotFoundError):
                    path.unlink()
        return {"temp_files": len(temp), "quarantined_files": len([p for p in quarantined if p.suffix == ".kvp"])}

    # ---- helpers ---------------------------------------------------------------------------

    def _form(self, quantization: str | None) -> str:
        return check_form(self, quantization)

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as error:
            raise StoreError(f"cannot read the index of packet store {self.root}: {error}; if it is damaged, move "
                             "index.sqlite aside and run `kvpacket store verify --quarantine` to re-index") from None


def _row(info: EntryInfo, used: float) -> tuple:
    """Index row of an entry, created and last used at ``used``."""
    return (info.key, info.quantization, info.size, info.checksum, info.model_fingerprint, info.tokenizer_fingerprint,
            info.adapter_fingerprint, info.dtype, info.tokens, info.positions, used, used)


def _is_store_dir(root: Path) -> bool:
    """A store (marker present), or a directory holding nothing but what a store creates first."""
    if (root / MARKER).is_file():
        return True
    return all(p.name in ("packets", "tmp", "quarantine") or p.name.startswith(("index.sqlite", f"{MARKER}."))
               for p in root.iterdir())


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _stale_temp(path: Path, now: float) -> bool:
    """A temp file whose writer process is gone (same host) or that is older than `STALE_TEMP_S`."""
    try:
        if now - path.stat().st_mtime > STALE_TEMP_S:
            return True
        pid = int(path.name.rsplit(".", 3)[-3])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
