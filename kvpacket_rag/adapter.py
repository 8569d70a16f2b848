"""Header/trailer soft-token adapters that make packets context independent.

An adapter is two small trainable matrices in the model's input-embedding
space: ``header [n_header, hidden]`` and ``trailer [n_trailer, hidden]``. Every
chunk is wrapped as ``[header; chunk; trailer]`` before its KV cache is built.
The model itself stays frozen. Files are safetensors with JSON metadata.

An adapter also says what each packet is built after (its ``prefix``):
``"none"`` builds ``[header; chunk; trailer]`` from position 0, as in the KV
Packet paper; ``"preamble"`` builds it right after the engine's chat preamble
(template start, system prompt, user-turn header), the prefix every chunk has in
the real prompt, so that packets share the one attention sink of the preamble
instead of each bringing its own. Packets stay independent of each other and of
the question either way.

An adapter may also carry a `BuildLoRA`: low-rank updates of the model's linear layers that apply only to
the wrapped chunk's tokens while its packet is built. The question is still read by the unchanged model.

An adapter may also carry calibration contexts (preamble prefix only): a few token sequences drawn from the
corpus, each read after the preamble and before the chunk while its packet is built. The packet is then the
mean, over the contexts, of the chunk's keys (at the packet's own positions) and values: a chunk in a retrieved
context is preceded by other passages, and the mean is the one fixed cache closest, in squared error, to what
the chunk computes after typical ones. Packets stay independent of each other and of the question.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CorruptPacketError, IncompatiblePacketError
from .fileio import atomic_write
from .lora import BuildLoRA
from .models import DEFAULT_MODEL, LoadedModel

NO_ADAPTER = "none"
PREFIX_NONE = "none"
PREFIX_PREAMBLE = "preamble"
PREFIXES = (PREFIX_NONE, PREFIX_PREAMBLE)
FORMAT_V1 = "kvpacket-adapter/1"  # header/trailer only: packets built from position 0
FORMAT_V2 = "kvpacket-adapter/2"  # adds the packet prefix
FORMAT_V3 = "kvpacket-adapter/3"  # adds the optional build-time LoRA
FORMAT = "kvpacket-adapter/4"  # adds the optional calibration contexts
FORMATS = (FORMAT_V1, FORMAT_V2, FORMAT_V3, FORMAT)
CALIBRATION = "calibration."  # tensor name prefix of the calibration contexts: calibration.0, calibration.1, ...
PRETRAINED_FILE = "adapter.safetensors"  # the adapter in a save_pretrained folder


class PacketAdapter(torch.nn.Module):
    """Trainable soft tokens wrapped around every chunk of one model.

    Args:
        header: float tensor ``[n_header, hidden]`` (n_header may be 0).
        trailer: float tensor ``[n_trailer, hidden]`` (n_trailer may be 0).
        model_fingerprint: fingerprint of the model the adapter belongs to.
        card: free-form JSON-serialisable metadata (training data, hyperparameters, ...).
        prefix: what every packet is built after: ``"none"`` (position 0) or ``"preamble"``.
        lora: low-rank updates of the model applied to the wrapped chunk while its packet is built (None: none).
        calibration: token id sequences (each non-empty) read after the preamble before the wrapped chunk while
            its packet is built, one build per sequence; the packet is the mean over them. Needs the
            ``"preamble"`` prefix. Empty: packets are built right after the prefix.
    """

    def __init__(self, header: torch.Tensor, trailer: torch.Tensor, model_fingerprint: str, card: dict | None = None,
                 prefix: str = PREFIX_NONE, lora: BuildLoRA | None = None,
                 calibration: Sequence[Sequence[int]] = ()):
        super().__init__()
        if header.dim() != 2 or trailer.dim() != 2 or header.shape[1] != trailer.shape[1]:
            raise ValueError(f"header/trailer must be [n, hidden] with the same hidden size, got {tuple(header.shape)} and {tuple(trailer.shape)}")
        if not header.is_floating_point() or not trailer.is_floating_point():
            raise ValueError(f"header/trailer must be floating point, got {header.dtype} and {trailer.dtype}")
        if prefix not in PREFIXES:
            raise ValueError(f"adapter prefix must be one of {', '.join(PREFIXES)}, got {prefix!r}")
        self.header = torch.nn.Parameter(header.detach().clone())
        self.trailer = torch.nn.Parameter(trailer.detach().clone())
        self.model_fingerprint = model_fingerprint
        self.card = dict(card or {})
        self.prefix = prefix
        self.lora = lora
        self.calibration = tuple(tuple(int(t) for t in ids) for ids in calibration)
        if self.calibration and prefix != PREFIX_PREAMBLE:
            raise ValueError("calibration contexts are read after the chat preamble: they need prefix='preamble'")
        if any(not ids or min(ids) < 0 for ids in self.calibration):
            raise ValueError("every calibration context must be a non-empty sequence of token ids >= 0")

    @classmethod
    def initialize(cls, model: LoadedModel, n_header: int = 8, n_trailer: int = 8, seed: int = 0,
                   prefix: str = PREFIX_NONE) -> "PacketAdapter":
        """New adapter drawn from N(mean, std) of the model's token-embedding matrix."""
        if n_header < 0 or n_trailer < 0:
            raise ValueError("adapter sizes must be >= 0")
        weight = model.model.get_input_embeddings().weight.detach().float()
        mean, std = weight.mean().item(), weight.std().item()
        generator = torch.Generator().manual_seed(seed)
        draw = lambda n: torch.randn(n, model.hidden_size, generator=generator) * std + mean  # noqa: E731
        return cls(draw(n_header), draw(n_trailer), model.fingerprint, prefix=prefix)

    def grown(self, model: LoadedModel, n_header: int, n_trailer: int, seed: int = 0) -> "PacketAdapter":
        """A larger copy (no card): new soft tokens, drawn as in `initialize`, go before the header and after the
        trailer, so the existing ones keep their offsets to the chunk; the build-time LoRA is kept.

        Raises:
            ValueError: a size smaller than this adapter's.
        """
        if n_header < self.n_header or n_trailer < self.n_trailer:
            raise ValueError(f"an adapter can only grow: it has {self.n_header}+{self.n_trailer} soft tokens, "
                             f"asked for {n_header}+{n_trailer}")
        new = PacketAdapter.initialize(model, n_header - self.n_header, n_trailer - self.n_trailer, seed=seed)
        header = torch.cat([new.header, self.header.detach().float().cpu()])
        trailer = torch.cat([self.trailer.detach().float().cpu(), new.trailer])
        return PacketAdapter(header, trailer, self.model_fingerprint, None, self.prefix, copy.deepcopy(self.lora),
                             self.calibration)

    @classmethod
    def empty(cls, model: LoadedModel, prefix: str = PREFIX_NONE) -> "PacketAdapter":
        """The 0+0 adapter: packets of the bare chunk (``prefix="none"``: the `no_recompute` baseline)."""
        zero = torch.zeros(0, model.hidden_size)
        return cls(zero, zero.clone(), model.fingerprint, prefix=prefix)

    def with_prefix(self, prefix: str) -> "PacketAdapter":
        """The same soft tokens (copied) for packets built after ``prefix`` (a new fingerprint unless unchanged)."""
        return PacketAdapter(self.header, self.trailer, self.model_fingerprint, self.card, prefix, copy.deepcopy(self.lora),
                             self.calibration)

    def with_lora(self, lora: BuildLoRA | None) -> "PacketAdapter":
        """The same soft tokens (copied) with ``lora`` as build-time weights (no card: a new adapter)."""
        return PacketAdapter(self.header, self.trailer, self.model_fingerprint, None, self.prefix, lora, self.calibration)

    def with_calibration(self, contexts: Sequence[Sequence[int]], card: dict | None = None) -> "PacketAdapter":
        """The same soft tokens and build LoRA (copied) with ``contexts`` as calibration contexts, built after the
        preamble; ``card`` describes the result (a new fingerprint)."""
        return PacketAdapter(self.header, self.trailer, self.model_fingerprint, card, PREFIX_PREAMBLE,
                             copy.deepcopy(self.lora), contexts)

    @property
    def n_header(self) -> int:
        return self.header.shape[0]

    @property
    def n_trailer(self) -> int:
        return self.trailer.shape[0]

    @property
    def is_empty(self) -> bool:
        """No soft tokens, no build-time LoRA and no calibration: its packets hold the bare chunk."""
        return self.n_header == 0 and self.n_trailer == 0 and self.lora is None and not self.calibration

    @property
    def fingerprint(self) -> str:
        """``none`` for a 0+0 adapter (``none+preamble`` with the preamble prefix), else sha256 hex over
        sizes, prefix and float32 values, build LoRA and calibration contexts included (adapters of prefix
        ``none`` keep their format-1 fingerprint, adapters without a LoRA their format-2 one, adapters without
        calibration their format-3 one)."""
        if self.is_empty:
            return NO_ADAPTER if self.prefix == PREFIX_NONE else f"{NO_ADAPTER}+{self.prefix}"
        prefix = "" if self.prefix == PREFIX_NONE else f"prefix={self.prefix}|"
        digest = hashlib.sha256(f"{self.n_header}|{self.n_trailer}|{prefix}".encode())
        tensors = [self.header, self.trailer]
        if self.lora is not None:
            digest.update(f"lora|{self.lora.rank}|{self.lora.alpha}|".encode())
            lora = self.lora.tensors()
            digest.update("|".join(sorted(lora)).encode())
            tensors += [lora[name] for name in sorted(lora)]
        for tensor in tensors:
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        for ids in self.calibration:
            digest.update(f"calibration|{len(ids)}|".encode())
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def check_model(self, model: LoadedModel) -> None:
        """Raise IncompatiblePacketError unless the adapter was made for ``model``."""
        if not self.is_empty and self.model_fingerprint != model.fingerprint:
            raise IncompatiblePacketError(
                f"this adapter was trained for another model (fingerprint {self.model_fingerprint[:12]}, "
                f"loaded model {model.name} is {model.fingerprint[:12]}); train one with `kvpacket train --model {model.name}`."
            )
        if self.header.shape[1] != model.hidden_size:
            raise IncompatiblePacketError(
                f"adapter hidden size {self.header.shape[1]} != model hidden size {model.hidden_size}"
            )
        if self.lora is not None:
            try:
                self.lora.check_model(model)
            except ValueError as error:
                raise IncompatiblePacketError(f"this adapter's build-time weights do not fit {model.name} ({error}); "
                                              f"train one with `kvpacket train --model {model.name}`") from error
        vocabulary = model.model.get_input_embeddings().num_embeddings
        if any(max(ids) >= vocabulary for ids in self.calibration):
            raise IncompatiblePacketError(f"this adapter's calibration contexts hold token ids beyond {model.name}'s "
                                          f"vocabulary of {vocabulary}; calibrate again with `kvpacket calibrate`")

    def building(self, model: LoadedModel, gate: torch.Tensor | None = None) -> contextlib.AbstractContextManager:
        """Context in which ``model`` computes as packets are built: with the build LoRA applied where ``gate``
        (``[batch, tokens, 1]``, 1 on wrapped-chunk tokens) says, or everywhere when None; a no-op without one."""
        return contextlib.nullcontext() if self.lora is None else self.lora.applied(model, gate)

    def wrap(self, chunk_embeddings: torch.Tensor) -> torch.Tensor:
        """``[header; chunk; trailer]`` along the sequence axis: ``[L, hidden] -> [n_h + L + n_t, hidden]``."""
        dtype, device = chunk_embeddings.dtype, chunk_embeddings.device
        return torch.cat([self.header.to(device, dtype), chunk_embeddings, self.trailer.to(device, dtype)])

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors) and ``path`` with ``.json`` suffix (the human-readable card)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": FORMAT if self.calibration else FORMAT_V3,  # format 3 files stay readable by 3's readers
                    "model_fingerprint": self.model_fingerprint, "prefix": self.prefix,
                    "fingerprint": self.fingerprint, "card": json.dumps(self.card, default=str)}
        tensors = {"header": self.header.detach().to("cpu", torch.float32).contiguous(),
                   "trailer": self.trailer.detach().to("cpu", torch.float32).contiguous()}
        if self.lora is not None:
            metadata["lora_alpha"] = repr(self.lora.alpha)
            tensors.update(self.lora.tensors())
        for i, ids in enumerate(self.calibration):
            tensors[f"{CALIBRATION}{i}"] = torch.tensor(ids, dtype=torch.int64)
        # safetensors creates owner-only files; an adapter is shared like a model file
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), mode=0o644)
        card = {**self.card, "model_fingerprint": self.model_fingerprint, "fingerprint": self.fingerprint,
                "n_header": self.n_header, "n_trailer": self.n_trailer, "prefix": self.prefix,
                "build_lora_rank": self.lora.rank if self.lora is not None else 0,
                "build_lora_targets": list(self.lora.targets) if self.lora is not None else [],
                "calibration_contexts": len(self.calibration),
                "calibration_tokens": [len(ids) for ids in self.calibration]}
        path.with_suffix(".json").write_text(json.dumps(card, indent=2, default=str) + "\n")
        return path

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a Hub-style folder: ``adapter.safetensors``, its ``adapter.json`` card and a ``README.md``
        model card (upload it with ``huggingface-cli upload``); returns the folder."""
        directory = Path(directory)
        self.save(directory / PRETRAINED_FILE)
        (directory / "README.md").write_text(self._model_card())
        return directory

    @classmethod
    def from_pretrained(cls, directory_or_repo: str | Path, model: LoadedModel | None = None,
                        revision: str | None = None) -> "PacketAdapter":
        """Load the adapter of a `save_pretrained` folder, or of a Hugging Face Hub repository holding one.

        Raises:
            FileNotFoundError: neither a folder with ``adapter.safetensors`` nor a reachable repository.
            CorruptPacketError, IncompatiblePacketError: as `load`.
        """
        folder = Path(directory_or_repo)
        if not folder.is_dir():
            folder = _download(str(directory_or_repo), revision)
        return cls.load(folder / PRETRAINED_FILE, model)

    def _model_card(self) -> str:
        base = self.card.get("model", "")
        front = ["---", "library_name: kvpacket-rag", "tags: [kv-cache, rag, kv-packet]"]
        front += [f"base_model: {base}"] if "/" in base else []
        lines = front + ["---", "", f"# KV packet adapter{f' for {base}' if base else ''}", "",
                         f"Header/trailer soft tokens ({self.n_header} + {self.n_trailer}) that make independently "
                         "computed KV caches of retrieved chunks (KV packets) work together without recomputation.",
                         f"Packets are built {'after the chat preamble' if self.prefix == PREFIX_PREAMBLE else 'from position 0'}.",
                         "", "```python", "from kvpacket_rag import PacketEngine, PacketAdapter", "",
                         "adapter = PacketAdapter.from_pretrained(\"THIS_FOLDER_OR_REPO\")",
                         f"engine = PacketEngine({base!r}, adapter=adapter)" if base else "engine = PacketEngine(MODEL, adapter=adapter)",
                         "```", "", f"- adapter fingerprint: `{self.fingerprint}`",
                         f"- model fingerprint: `{self.model_fingerprint}`"]
        lines += [f"- {key}: {self.card[key]}" for key in ("data", "samples", "epochs", "lr", "final_loss", "steps")
                  if key in self.card]
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: str | Path, model: LoadedModel | None = None) -> "PacketAdapter":
        """Read an adapter file (format 1 to 4); with ``model``, also check it belongs to that model.

        Raises:
            FileNotFoundError, CorruptPacketError (unreadable, malformed, altered or from a newer version),
            IncompatiblePacketError (another model).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {path} does not exist; train one with `kvpacket train` or pass --adapter none")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise CorruptPacketError(f"adapter file {path} is unreadable ({error}); re-train or re-download it") from error
        file_format = metadata.get("format")
        if isinstance(file_format, str) and file_format.startswith("kvpacket-adapter/") and file_format not in FORMATS:
            raise CorruptPacketError(f"adapter file {path} has format {file_format}, written by a newer kvpacket-rag; "
                                     "upgrade kvpacket-rag to read it")
        if file_format not in FORMATS or not {"header", "trailer"} <= tensors.keys():
            raise CorruptPacketError(f"{path} is not a kvpacket adapter file (no header/trailer tensors or format tag)")
        if not metadata.get("model_fingerprint"):
            raise CorruptPacketError(f"adapter file {path} does not say which model it belongs to; re-train it")
        try:
            card = json.loads(metadata.get("card", "{}"))
            if not isinstance(card, dict):
                raise ValueError("the card is not a JSON object")
            calibration = _calibration(tensors) if file_format == FORMAT else []
            lora = (BuildLoRA.from_tensors(tensors, float(metadata.get("lora_alpha", "nan")))
                    if file_format in (FORMAT_V3, FORMAT) else None)
            adapter = cls(tensors["header"], tensors["trailer"], metadata["model_fingerprint"], card,
                          prefix=metadata.get("prefix", PREFIX_NONE) if file_format != FORMAT_V1 else PREFIX_NONE,
                          lora=lora, calibration=calibration)
        except ValueError as error:
            raise CorruptPacketError(f"adapter file {path} is malformed ({error}); re-train it") from error
        if metadata.get("fingerprint") != adapter.fingerprint:
            raise CorruptPacketError(f"adapter file {path} fails its checksum; it was altered or truncated")
        if model is not None:
            adapter.check_model(model)
        return adapter


def _calibration(tensors: dict[str, torch.Tensor]) -> list[list[int]]:
    """Pop ``calibration.0 .. calibration.{n-1}`` (1-D int64) from ``tensors``, in order.

    Raises:
        ValueError: a gap in the numbering, or a tensor that is not 1-D int64.
    """
    names = [name for name in tensors if name.startswith(CALIBRATION)]
    contexts = []
    for i in range(len(names)):
        ids = tensors.pop(f"{CALIBRATION}{i}", None)
        if ids is None or ids.dim() != 1 or ids.dtype != torch.int64:
            raise ValueError(f"calibration contexts must be 1-D int64 tensors {CALIBRATION}0..{len(names) - 1}")
        contexts.append(ids.tolist())
    return contexts


def _download(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of a Hub repository's adapter files."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=[PRETRAINED_FILE, "adapter.json", "README.md"]))
    except Exception as error:  # offline, unknown repository, bad revision: one clear message
        raise FileNotFoundError(f"{repo_id} is neither a folder with {PRETRAINED_FILE} nor a reachable Hugging Face "
                                f"repository ({type(error).__name__}); pass a folder written by save_pretrained") from error


SHIPPED_ADAPTERS = {DEFAULT_MODEL: Path(__file__).parent / "adapters" / "smollm2-135m-instruct.safetensors"}
"""The trained adapter that ships with the package, per model name."""


def shipped_adapter(model: "LoadedModel | str") -> Path | None:
    """The file of the adapter shipped for ``model`` (a name, or a loaded model: matched by name or, when its
    weights were loaded from elsewhere, by the model fingerprint the adapter records), or None."""
    name = model if isinstance(model, str) else model.name
    path = SHIPPED_ADAPTERS.get(name)
    if path is not None and path.is_file():
        return path
    if isinstance(model, str):
        return None
    for path in SHIPPED_ADAPTERS.values():
        if path.is_file() and _recorded_model_fingerprint(path) == model.fingerprint:
            return path
    return None


def _recorded_model_fingerprint(path: Path) -> str | None:
    try:
        with safe_open(str(path), "pt") as handle:
            return (handle.metadata() or {}).get("model_fingerprint")
    except (SafetensorError, OSError):
        return None


def resolve_adapter(model: LoadedModel, adapter: "PacketAdapter | str | Path | None") -> PacketAdapter:
    """The adapter an option names: an object, ``None``/``"none"`` (0+0, bare packets), ``"default"`` (the shipped
    adapter of the model), a file path or a `PacketAdapter.save_pretrained` folder; a name may end in ``+preamble`` (its packets built after the chat
    preamble, see `PacketAdapter.with_prefix`), e.g. ``"none+preamble"``.

    Raises:
        IncompatiblePacketError: ``"default"`` for a model without a shipped adapter, or a foreign adapter.
    """
    if adapter is None:
        return PacketAdapter.empty(model)
    if isinstance(adapter, PacketAdapter):
        adapter.check_model(model)
        return adapter
    spec, prefix = str(adapter), None
    if spec.endswith(f"+{PREFIX_PREAMBLE}"):
        spec, prefix = spec.removesuffix(f"+{PREFIX_PREAMBLE}"), PREFIX_PREAMBLE
    if spec == NO_ADAPTER:
        resolved = PacketAdapter.empty(model)
    elif spec == "default":
        shipped = shipped_adapter(model)
        if shipped is None:
            raise IncompatiblePacketError(
                f"no trained adapter ships for {model.name}; train one with "
                f"`kvpacket train --model {model.name} --out adapter.safetensors` and pass its path, "
                "or pass adapter=None for bare packets (lower quality).")
        resolved = PacketAdapter.load(shipped, model)
    elif Path(spec).is_dir():
        resolved = PacketAdapter.from_pretrained(spec, model)
    else:
        resolved = PacketAdapter.load(spec, model)
    return resolved.with_prefix(prefix) if prefix else resolved
