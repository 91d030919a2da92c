"""Fine-tuned roles as PEFT LoRA adapters, co-served with their base model.

A role given as ``adapter: PATH`` with ``base: ROLE`` is a LoRA adapter directory (PEFT's
``save_pretrained``) on that role's model. Every adapter of one base is loaded into the
base's worker (:class:`~eft_router.roles.worker.RoleWorker` with ``adapters``), which then
answers for the base and all its adapters from one set of weights, each forward pass mixing
their rows (PEFT's mixed-batch inference: ``adapter_names`` per row, :data:`BASE_ADAPTER`
for the base's own rows).

An adapter that cannot serve its base fails here, before the worker starts, with one line
naming the role: not an adapter directory, not LoRA, trained on a model of another shape,
target modules the base does not have, weights of other shapes (a different vocabulary in
``modules_to_save``), or a tokenizer that differs from the base's.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
ADAPTER_CONFIG = "adapter_config.json"
MAX_DETAIL = 400  # characters of PEFT's own error kept in ours (a shape mismatch lists every tensor)
# config fields that must agree between an adapter's recorded base model and the base role's
SHAPE_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
)


class AdapterError(ValueError):
    """An adapter role cannot be served on its base."""

    def __init__(self, role: str, path: str, problem: str) -> None:
        super().__init__(f"role {role!r}: adapter {path!r}: {problem}")
        self.role, self.path, self.problem = role, path, problem


@dataclass(frozen=True)
class Adapter:
    """An adapter role's source: the LoRA directory and the role whose model it adapts."""

    path: str
    base: str


def read_adapter_config(role: str, path: str) -> dict:
    """The adapter's ``adapter_config.json``; refuses what is not a LoRA adapter directory."""
    file = Path(path).expanduser() / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterError(role, path, f"not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(role, path, f"{ADAPTER_CONFIG} is not readable JSON: {err}") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(role, path, f"only LoRA adapters can be co-served, this one is {config.get('peft_type')!r}")
    return config


def _model_config(path: str | Path) -> dict | None:
    file = Path(path).expanduser() / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def check_adapter(role: str, path: str, base: str, base_model: str) -> None:
    """Fail fast on what can be told without loading: the directory, the adapter type, and
    the shape of the model the adapter was trained on, where that model is on this machine."""
    config = read_adapter_config(role, path)
    recorded = config.get("base_model_name_or_path")
    trained_on = _model_config(recorded) if recorded else None
    ours = _model_config(base_model)
    if trained_on is None or ours is None:
        return  # a hub id, or a moved directory: the shapes are checked when the weights load
    differ = [f"{k} {trained_on.get(k)} vs {ours.get(k)}" for k in SHAPE_FIELDS if trained_on.get(k) != ours.get(k)]
    if differ:
        raise AdapterError(
            role, path, f"was trained on {recorded!r}, a different model from base role {base!r}'s {base_model!r} ({', '.join(differ)})"
        )


def _check_tokenizer(role: str, path: str, base: str, base_model: str) -> None:
    from transformers import AutoTokenizer

    from .models import TOKENIZER_FILES

    if not any((Path(path).expanduser() / name).is_file() for name in TOKENIZER_FILES):
        return  # no tokenizer of its own: it uses the base's
    if not any((Path(base_model).expanduser() / name).is_file() for name in TOKENIZER_FILES):
        return
    if AutoTokenizer.from_pretrained(path).get_vocab() != AutoTokenizer.from_pretrained(base_model).get_vocab():
        raise AdapterError(role, path, f"its tokenizer differs from that of base role {base!r}: the roles must share one vocabulary")


def attach_adapters(base: str, base_model: str, model: torch.nn.Module, adapters: Mapping[str, str]) -> torch.nn.Module:
    """``model`` (base role ``base``'s, loaded from ``base_model``) with every adapter loaded
    by PEFT under its role's name, for mixed-batch inference."""
    from peft import PeftModel

    peft_model = None
    for role, path in adapters.items():
        check_adapter(role, path, base, base_model)
        _check_tokenizer(role, path, base, base_model)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)  # PEFT 0.21 on transformers 5
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, path, adapter_name=role, is_trainable=False)
                else:
                    peft_model.load_adapter(path, adapter_name=role, is_trainable=False)
        except Exception as err:  # PEFT's own errors: missing target modules, shape mismatches
            detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
            if len(detail) > MAX_DETAIL:
                detail = detail[:MAX_DETAIL] + "..."
            raise AdapterError(role, path, f"does not fit the model of base role {base!r} ({base_model}): {detail}") from err
    return peft_model if peft_model is not None else model
