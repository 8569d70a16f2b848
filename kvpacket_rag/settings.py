"""Engine settings the way the LangChain and LlamaIndex ecosystems take them: keyword arguments first, then
environment variables, then defaults.

====================  ===========================================================  =====================
variable              meaning                                                      default
====================  ===========================================================  =====================
``KVPACKET_MODEL``    Hugging Face id or directory                                 the embedded model
``KVPACKET_ADAPTER``  ``default``, ``none``, a file (``+preamble`` allowed)        ``default``
``KVPACKET_DEVICE``   ``cpu``, ``cuda``, ``cuda:1``, ...                           ``cpu``
``KVPACKET_DTYPE``    ``float32``, ``bfloat16``, ``float16``                       the device's default
``KVPACKET_STORE``    packet store: a directory or a ``redis://`` URL              in-process memory
====================  ===========================================================  =====================

Example:
    >>> engine = shared_engine(model=None, store="packets/")  # KVPACKET_DEVICE=cuda python app.py
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from .engine import PacketEngine
    from .store import PacketStore

ENVIRONMENT = {"model": "KVPACKET_MODEL", "adapter": "KVPACKET_ADAPTER", "device": "KVPACKET_DEVICE",
               "dtype": "KVPACKET_DTYPE", "store": "KVPACKET_STORE"}
"""The environment variable read for each setting left unset."""


@dataclass(frozen=True)
class EngineSettings:
    """Resolved settings of an engine (None: the engine's default).

    Attributes:
        model: Hugging Face id or directory. adapter: see `kvpacket_rag.adapter.resolve_adapter`.
        device, dtype: where and how the model is loaded. store: a store spec for `kvpacket_rag.store.open_store`.
    """

    model: str | None = None
    adapter: str | None = "default"
    device: str | None = "cpu"
    dtype: str | None = None
    store: str | None = None

    @classmethod
    def resolve(cls, **given: str | None) -> "EngineSettings":
        """Settings from keyword arguments, then ``KVPACKET_*`` variables, then the defaults.

        A keyword present counts as given, even when None (``adapter=None``: bare packets); only absent names
        are read from the environment.

        Raises:
            TypeError: an unknown setting name.
        """
        unknown = set(given) - set(ENVIRONMENT)
        if unknown:
            raise TypeError(f"unknown engine settings {sorted(unknown)}; valid: {', '.join(ENVIRONMENT)}")
        return cls(**{**from_environment(given), **given})

    def engine(self, store: "PacketStore | None" = None) -> "PacketEngine":
        """A new engine with these settings (``store`` overrides the ``store`` spec).

        With adapter ``default`` and a model for which no adapter ships, packets are bare (with a warning), so
        that plain chat works with any supported model.
        """
        from .adapter import shipped_adapter
        from .engine import PacketEngine
        from .models import DEFAULT_MODEL, load_model
        from .store import open_store

        if store is None and self.store is not None:
            store = open_store(self.store)
        model = load_model(self.model, device=self.device or "cpu", dtype=self.dtype)
        adapter = self.adapter
        if adapter == "default" and shipped_adapter(model) is None:
            warnings.warn(f"no trained adapter ships for {model.name or DEFAULT_MODEL}: packets are bare (lower answer "
                          "quality through documents; plain chat is unaffected). Train one with `kvpacket train` and "
                          "pass its file as the adapter setting.", UserWarning, stacklevel=3)
            adapter = None
        return PacketEngine(model, adapter=adapter, store=store)


def from_environment(given: Mapping[str, object]) -> dict[str, str]:
    """The ``KVPACKET_*`` value of every setting absent from ``given`` (empty variables are unset)."""
    return {name: os.environ[variable] for name, variable in ENVIRONMENT.items()
            if name not in given and os.environ.get(variable)}


_ENGINES: dict[tuple, "PacketEngine"] = {}
_LOCK = threading.Lock()


def shared_engine(packet_store: "PacketStore | None" = None, **given: str | None) -> "PacketEngine":
    """One engine per distinct settings (and store object) in this process, loaded on first use.

    Args:
        packet_store: a store object for the engine; otherwise the ``store`` setting names one.
        given: settings (``model``, ``adapter``, ``device``, ``dtype``, ``store`` spec); absent ones come from the
            environment (see `EngineSettings.resolve`).
    """
    settings = EngineSettings.resolve(**given)
    key = (settings, id(packet_store) if packet_store is not None else None)
    with _LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = settings.engine(packet_store)
        return _ENGINES[key]
