"""Incremental detokenisation and stop conditions, one token at a time.

Speculative blocks emit several tokens at once, but stops are checked per token so that a
stop in the middle of a block ends the output exactly where plain decoding would. Text that
could still turn into a stop string (or an incomplete UTF-8 sequence) is held back until it
is decided, so a stream never shows text that the final answer does not contain.
"""

from __future__ import annotations

from typing import Collection, Sequence

from transformers import PreTrainedTokenizerBase

STOP, LENGTH = "stop", "length"


class StopChecker:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop_token_ids: Collection[int],
        stop_strings: Sequence[str],
        max_new_tokens: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop_strings = tuple(stop_strings)
        self.max_new_tokens = max_new_tokens
        self.token_ids: list[int] = []
        self.text = ""  # decided text, already returned by feed()
        self._pending = ""  # decoded but held back
        self._prefix_offset = 0
        self._read_offset = 0
        self.finish_reason: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def feed(self, token_id: int) -> str:
        """Account one generated token; return the newly decided text. Sets
        ``finish_reason`` when generation must end (the token is still counted)."""
        self.token_ids.append(token_id)
        if token_id in self.stop_token_ids:
            self.finish_reason = STOP
            return self._flush()
        # Incremental decode over a short window: re-decode from the previous read point so
        # that tokenizers that merge across tokens (byte-level BPE, sentencepiece spaces) agree.
        window = self.token_ids[self._prefix_offset :]
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(window)
        if not full.endswith("\ufffd"):
            self._pending += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        out = self._check_strings()
        if self.finish_reason is None and len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = LENGTH
            out += self._flush()
        return out

    def _check_strings(self) -> str:
        if not self.stop_strings:
            return self._flush()
        search_from = max(0, len(self.text) - max(map(len, self.stop_strings)))
        haystack = self.text + self._pending
        hits = [i for s in self.stop_strings if (i := haystack.find(s, search_from)) >= 0]
        if hits:
            self.finish_reason = STOP
            decided = haystack[: min(hits)][len(self.text) :]
            self._pending = ""
            self.text += decided
            return decided
        hold = self._held_back_len(haystack)
        cut = len(haystack) - hold
        decided = haystack[len(self.text) : cut] if cut > len(self.text) else ""
        self.text += decided
        self._pending = haystack[len(self.text) :]
        return decided

    def _held_back_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _flush(self) -> str:
        out, self._pending = self._pending, ""
        self.text += out
        return out
