"""Tiny random-initialised role families, saved like hub models, for tests and benchmarks.

No model hub is reachable here, so tests build their models from configs. Each family is a
word-level tokenizer plus one ``LlamaForCausalLM`` per role, saved with ``save_pretrained``
so that loading goes through exactly the code path real models take.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ("<unk>", "<eos>")


@dataclass(frozen=True)
class TinyModel:
    """Shape of one tiny Llama; ``init_std`` large makes peaked (informative) distributions."""

    hidden: int = 32
    layers: int = 1
    heads: int = 4
    seed: int = 0
    init_std: float = 0.02
    pad_rows: int = 0  # extra embedding rows beyond the tokenizer, as padded hub models have


def tiny_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_llama(vocab_size: int, spec: TinyModel, context_length: int = 512) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size + spec.pad_rows,
        hidden_size=spec.hidden,
        intermediate_size=spec.hidden * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=context_length,
        initializer_range=spec.init_std,
        tie_word_embeddings=False,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config).eval()


def build_tiny_family(
    root: Path | str, words: list[str], roles: Mapping[str, TinyModel], context_length: int = 512
) -> dict[str, str]:
    """Save a tokenizer and one model per role under ``root``; return role -> path."""
    root = Path(root)
    tokenizer = tiny_tokenizer(words)
    paths = {}
    for role, spec in roles.items():
        path = root / role
        tiny_llama(len(tokenizer), spec, context_length).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[role] = str(path)
    return paths


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_lora(base: str, out: Path | str, seed: int, rank: int = 4, targets: tuple[str, ...] = LORA_TARGETS) -> str:
    """A LoRA adapter of the model at ``base`` with both factors random (PEFT's default
    init is a no-op update), saved with ``save_pretrained``; returns its path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return str(out)


def merged_lora(base: str, adapter: str, out: Path | str) -> str:
    """The adapter merged into a full copy of its base (PEFT's ``merge_and_unload``), saved
    with the base's tokenizer: the reference a co-served adapter role must equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)
