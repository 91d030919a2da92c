"""Where a role's model comes from, checked before anything loads it.

Loading a bad path through transformers fails late and obscurely: a missing directory is
taken for a hub id ("Repo id must be in the form..."), a directory without a model fails in
the tokenizer backend, and a hub id without network retries for most of a minute. These
checks answer in well under a second with one line naming the role, the path and what is
wrong.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HUB_HOST, HUB_TIMEOUT_S = "huggingface.co", 3.0


class ModelPathError(ValueError):
    """A role's model cannot be loaded from where its config says."""

    def __init__(self, role: str, model: str, problem: str) -> None:
        super().__init__(f"role {role!r}: model {model!r}: {problem}")
        self.role, self.model, self.problem = role, model, problem


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def check_model(role: str, model: str, need_tokenizer: bool = True) -> None:
    """Raise :class:`ModelPathError` unless ``model`` is a model directory (with a tokenizer
    when ``need_tokenizer``), or a hub id that is cached or reachable."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelPathError(role, model, "not a model directory (it is a file)")
        if not (path / "config.json").is_file():
            raise ModelPathError(role, model, "not a model directory (no config.json)")
        if need_tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ModelPathError(role, model, f"no tokenizer in the directory (none of {', '.join(TOKENIZER_FILES)})")
        return
    if path.is_absolute() or model.startswith((".", "~")) or not HUB_ID.match(model):
        raise ModelPathError(role, model, "not found (no such directory)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str) and os.path.isfile(cached):
        return
    if not _hub_reachable():
        raise ModelPathError(role, model, "not a local directory, not in the Hugging Face cache, and the hub is offline")
