"""Measurements that say whether a family is fit for EFT: does the large base know more
than the small one, and is it really slower to step.

Both are measured on the saved models at the end of a build and written to the manifest.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .metrics import is_factual
from .world import EvalPrompt


@torch.inference_mode()
def fact_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[EvalPrompt]) -> float:
    """Greedy completion of ``<bos>{question}`` (the corpus's question-and-answer form), graded
    on its first sentence: what the base model knows, with no chat format involved."""
    correct = 0
    for prompt in prompts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt.question)["input_ids"]]])
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split(".")[0]
        correct += is_factual(answer, prompt)
    return correct / len(prompts)


@torch.inference_mode()
def decode_step_seconds(model: PreTrainedModel, context: int = 32, repeats: int = 60) -> float:
    """Median wall time of one cached single-token decode step after ``context`` tokens."""
    ids = torch.arange(context).unsqueeze(0) % model.config.vocab_size
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        model(input_ids=ids[:, i % context : i % context + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - t)
        cache.crop(-1)
    return statistics.median(times)
