"""Training loops for the embedded family: pre-training, supervised chat fine-tuning, DPO.

Short and plain on purpose (no Trainer): the family must build in minutes on two CPU cores,
deterministically, with a progress bar per stage. Every loop is AdamW with linear warm-up
and cosine decay over a fixed number of steps, batches drawn from a seeded generator.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from .world import chat_messages

IGNORE = -100


@dataclass(frozen=True)
class Shape:
    """A Llama's size. Depth sets the cached decode step's wall time on a CPU (per-layer
    overhead dominates tiny models), width sets what it can memorise."""

    hidden: int
    layers: int
    heads: int = 4
    context: int = 256


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20
    seq_len: int = 64  # pre-training window


def new_model(tokenizer: PreTrainedTokenizerBase, shape: Shape, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.hidden * 3,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _optimise(
    model: torch.nn.Module, schedule: Schedule, loss_of: Callable[[int], torch.Tensor], desc: str, quiet: bool
) -> list[float]:
    """Run ``schedule.steps`` steps of ``loss_of(step)``; returns the loss curve."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=schedule.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < schedule.warmup:
            return (step + 1) / schedule.warmup
        progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    bar = tqdm(range(schedule.steps), desc=desc, disable=quiet, leave=False, mininterval=1.0)
    for step in bar:
        loss = loss_of(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    lines: Sequence[str],
    schedule: Schedule,
    seed: int,
    desc: str = "pre-train",
    quiet: bool = False,
) -> list[float]:
    """Next-token loss on random windows of the packed corpus (``<bos> line <eos>`` each)."""
    stream: list[int] = []
    for ids in tokenizer(list(lines))["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    data = torch.tensor(stream)
    n = schedule.seq_len
    gen = torch.Generator().manual_seed(seed)

    def loss_of(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(data) - n, (schedule.batch_size,), generator=gen)
        batch = torch.stack([data[s : s + n] for s in starts.tolist()])
        return model(input_ids=batch, labels=batch).loss

    return _optimise(model, schedule, loss_of, desc, quiet)


def encode_chat(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of a full exchange, and where the answer starts (the loss starts there)."""
    prompt = tokenizer.apply_chat_template(chat_messages(question), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat_messages(question, answer), tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids, "chat template must extend the generation prompt"
    return full_ids, len(prompt_ids)


def _padded(rows: Sequence[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless epochs of shuffled index batches."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def sft(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    schedule: Schedule,
    seed: int,
    desc: str = "fine-tune",
    quiet: bool = False,
) -> list[float]:
    """Chat fine-tuning: loss on the answer tokens (and the closing EOS) only."""
    encoded = [encode_chat(tokenizer, q, a) for q, a in examples]
    batches = _batches(len(encoded), schedule.batch_size, seed)

    def loss_of(step: int) -> torch.Tensor:
        rows = [encoded[i] for i in next(batches)]
        ids = _padded([r for r, _ in rows], tokenizer.pad_token_id)
        labels = _padded([[IGNORE] * start + r[start:] for r, start in rows], IGNORE)
        return model(input_ids=ids, labels=labels).loss  # right padding: causal attention never sees it

    return _optimise(model, schedule, loss_of, desc, quiet)


def answer_logprobs(model: LlamaForCausalLM, ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log-probs of the answer tokens of each (right-padded) row."""
    logits = model(input_ids=ids).logits[:, :-1]
    token_lp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_lp * answer_mask[:, 1:]).sum(-1)


def dpo(
    policy: LlamaForCausalLM,
    reference: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str, str]],
    schedule: Schedule,
    seed: int,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    desc: str = "DPO",
    quiet: bool = False,
) -> list[float]:
    """Direct preference optimisation (Rafailov et al. 2023) against a frozen reference:
    ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` over answer log-probs, plus
    ``nll_weight`` times the chosen answers' per-token negative log-likelihood, which keeps a
    tiny policy from collapsing onto degenerate outputs (as in RPO, Pang et al. 2024)."""
    reference.eval().requires_grad_(False)
    rows = []
    for question, chosen, rejected in pairs:
        for answer in (chosen, rejected):
            ids, start = encode_chat(tokenizer, question, answer)
            rows.append((ids, [0.0] * start + [1.0] * (len(ids) - start)))
    batches = _batches(len(pairs), schedule.batch_size, seed)

    def loss_of(step: int) -> torch.Tensor:
        picked = [rows[2 * i + j] for i in next(batches) for j in (0, 1)]  # chosen, rejected interleaved
        ids = _padded([r for r, _ in picked], tokenizer.pad_token_id)
        mask = torch.tensor([m + [0.0] * (ids.shape[1] - len(m)) for _, m in picked])
        pi = answer_logprobs(policy, ids, mask)
        with torch.no_grad():
            ref = answer_logprobs(reference, ids, mask)
        margin = (pi - ref).view(-1, 2)
        chosen_nll = -(pi.view(-1, 2)[:, 0] / mask.view(-1, 2, mask.shape[1])[:, 0, 1:].sum(-1)).mean()
        return -F.logsigmoid(beta * (margin[:, 0] - margin[:, 1])).mean() + nll_weight * chosen_nll

    return _optimise(policy, schedule, loss_of, desc, quiet)
