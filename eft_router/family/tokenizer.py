"""The family's shared tokenizer: byte-level BPE trained on the pre-training corpus.

Why byte-level BPE: it is lossless (``decode(encode(line)) == line`` for any text, which the
tests check on every corpus line and chat rendering), has no unknown token, and is what real
EFT families (Llama-style) use, so the decoder's incremental detokenisation is exercised on
merges across tokens. All five roles load this one tokenizer, so their vocabularies agree
by construction.

What callers get (checked by the tests):

* ``tokenizer("text")`` adds NOTHING: no post-processor, so no BOS/EOS is inserted behind
  anyone's back. Pre-training lines are encoded by the trainer as
  ``[bos_token_id] + tokenizer(line)["input_ids"] + [eos_token_id]``.
* Chat prompts go through ``apply_chat_template`` (:data:`CHAT_TEMPLATE`), which writes
  ``<|bos|>`` itself: ``<|bos|><|user|>{question}<|assistant|>`` with
  ``add_generation_prompt=True``, ``...<|assistant|>{answer}<|eos|>`` for a full
  conversation. Encoding that string (with or without special tokens: nothing is added)
  gives each special token as one id.
* The generated answer ends with ``<|eos|>`` (``eos_token_id``), the stop token.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, USER, ASSISTANT = "<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"
# ids 0..4 in this order; EOS is id 1, the id `eft_router.tiny.tiny_llama` configures as eos.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, USER, ASSISTANT)

# Single user turn then an assistant turn, any number of times; no system role (the family
# is not trained with one), so an unknown role is an error rather than silently dropped.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(lines: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``lines``; deterministic for the same lines (the tests train
    twice and compare vocabularies and merges)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        clean_up_tokenization_spaces=False,  # would rewrite " 's" etc. and break round trips
        chat_template=CHAT_TEMPLATE,
    )
    return tok
