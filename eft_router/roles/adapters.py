"""Fine-tuned roles as PEFT LoRA adapters, co-served with their base model.

A role given as ``adapter: PATH`` with ``base: ROLE`` is a LoRA adapter directory (PEFT's
``save_pretrained``) on that role's model. Every adapter of one base is loaded into the
base's worker (:class:`~eft_router.roles.worker.RoleWorker` with ``adapters``), which then
answers for the base and all its adapters from one set of weights, each forward pass mixing
their rows.

PEFT loads and checks the adapters; the forward pass is our own equivalent of PEFT's
mixed-batch inference (``adapter_names`` per row), tested against it: each LoRA linear
layer becomes a :class:`MixedLoRALinear` that adds each adapter's low-rank update to its own
rows, which the worker keeps contiguous (its members' KV slots are contiguous ranges). On
the tiny CPU models PEFT's own mixed batch cost 2.5x two separate passes (it walks every
module to register hooks on each forward, and gathers rows per adapter per layer); this
costs a slice and two small matmuls per adapter and layer.

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


@dataclass
class LoRARows:
    """Which adapter each batch row of the current forward pass uses: ``(start, end, role)``
    segments of rows (rows outside every segment get no update). Set by the worker before
    each pass; read by every :class:`MixedLoRALinear`."""

    segments: list[tuple[int, int, str]]

    @classmethod
    def of(cls, roles: list[str], base: str) -> "LoRARows":
        """Run-length segments of one role per row, leaving out the ``base`` role's rows."""
        segments: list[tuple[int, int, str]] = []
        for i, role in enumerate(roles):
            if segments and segments[-1][2] == role:
                segments[-1] = (segments[-1][0], i + 1, role)
            else:
                segments.append((i, i + 1, role))
        return cls([s for s in segments if s[2] != base])


class MixedLoRALinear(torch.nn.Module):
    """A linear layer and its LoRA updates, one per adapter role: row segment ``(s, e, r)`` of
    the batch gets ``x[s:e] @ A_r^T @ (scale_r B_r)^T`` (plus B's bias, if the adapter has
    one) on top of the base layer's output."""

    def __init__(self, base: torch.nn.Linear, rows: LoRARows) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.lora_a = torch.nn.ParameterDict()
        self.lora_b = torch.nn.ParameterDict()  # scaled
        self.lora_bias = torch.nn.ParameterDict()

    def add(self, role: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.lora_a[role] = torch.nn.Parameter(a, requires_grad=False)
        self.lora_b[role] = torch.nn.Parameter(b, requires_grad=False)
        if bias is not None:
            self.lora_bias[role] = torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for start, end, role in self.rows.segments:
            if role in self.lora_a:
                update = torch.nn.functional.linear(torch.nn.functional.linear(x[start:end], self.lora_a[role]), self.lora_b[role])
                if role in self.lora_bias:
                    update = update + self.lora_bias[role]
                out[start:end] += update.to(out.dtype)
        return out


def _mixed(paths: Mapping[str, str], peft_model: torch.nn.Module) -> tuple[torch.nn.Module, LoRARows]:
    """The base model of ``peft_model`` with each PEFT LoRA layer replaced by a
    :class:`MixedLoRALinear` holding the same weights (``paths``: adapter role -> its
    directory, for errors). Refuses what it does not compute: LoRA on other layer types,
    variants (DoRA...), whole modules saved with the adapter (``modules_to_save``)."""
    from peft.tuners.lora.layer import Linear, LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    rows = LoRARows([])
    model = peft_model.get_base_model()
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            role = next(iter(module.modules_to_save))
            raise AdapterError(role, paths[role], f"saves whole modules ({name}): only LoRA updates of linear layers can be co-served")
        if not isinstance(module, LoraLayer):
            continue
        roles = list(module.lora_A) if hasattr(module, "lora_A") else []
        if not isinstance(module, Linear):
            raise AdapterError(roles[0], paths[roles[0]], f"puts LoRA on {name} ({type(module).__name__}): only linear layers can be co-served")
        for role in module.lora_variant:
            raise AdapterError(role, paths[role], f"uses a LoRA variant ({type(module.lora_variant[role]).__name__}): only plain LoRA can be co-served")
        mixed = MixedLoRALinear(module.get_base_layer(), rows)
        for role in roles:
            b = module.lora_B[role]
            mixed.add(role, module.lora_A[role].weight.detach(), b.weight.detach() * module.scaling[role], None if b.bias is None else b.bias.detach())
        model.set_submodule(name, mixed)
    return model, rows


def attach_adapters(base: str, base_model: str, model: torch.nn.Module, adapters: Mapping[str, str]) -> tuple[torch.nn.Module, LoRARows]:
    """``model`` (base role ``base``'s, loaded from ``base_model``) with every adapter loaded
    by PEFT under its role's name and turned into :class:`MixedLoRALinear` layers, and the
    :class:`LoRARows` that tells them, per forward pass, which rows are whose."""
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
    return _mixed(dict(adapters), peft_model)
