"""The shared-vocabulary check: EFT adds log-probs token by token, so every role must map
every token to the same id. Padded embedding rows are allowed (the worker trims them);
different token-to-id maps are refused, naming the first differences."""

from __future__ import annotations

from typing import Mapping

from transformers import PreTrainedTokenizerBase

MAX_LISTED = 5


class VocabularyMismatch(ValueError):
    pass


def differences(ref: dict[str, int], other: dict[str, int]) -> list[str]:
    by_id_ref = {i: t for t, i in ref.items()}
    by_id_other = {i: t for t, i in other.items()}
    out = []
    for i in sorted(set(by_id_ref) | set(by_id_other)):
        a, b = by_id_ref.get(i), by_id_other.get(i)
        if a != b:
            out.append(f"id {i}: {a!r} vs {b!r}")
            if len(out) == MAX_LISTED:
                break
    return out


def check_shared_vocabulary(tokenizers: Mapping[str, PreTrainedTokenizerBase]) -> int:
    """Return the shared vocabulary size, or raise :class:`VocabularyMismatch`."""
    if not tokenizers:
        raise VocabularyMismatch("roles: at least one role is needed")
    (ref_role, ref_tok), *rest = tokenizers.items()
    ref_vocab = ref_tok.get_vocab()
    for role, tok in rest:
        vocab = tok.get_vocab()
        if vocab != ref_vocab:
            diffs = differences(ref_vocab, vocab)
            raise VocabularyMismatch(
                f"role {role!r} does not share role {ref_role!r}'s vocabulary "
                f"({len(vocab)} vs {len(ref_vocab)} tokens); first differences: " + "; ".join(diffs)
            )
    return len(ref_tok)
