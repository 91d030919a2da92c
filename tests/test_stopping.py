"""Stop conditions and incremental text, token by token."""

from __future__ import annotations

from eft_router.core.stopping import LENGTH, STOP, StopChecker
from eft_router.tiny import tiny_tokenizer

TOK = tiny_tokenizer(["a", "b", "c", "ab", "ba"])


def ids(text: str) -> list[int]:
    return TOK(text)["input_ids"]


def feed_all(checker: StopChecker, tokens: list[int]) -> tuple[list[str], int]:
    pieces = []
    for n, t in enumerate(tokens, 1):
        pieces.append(checker.feed(t))
        if checker.finish_reason:
            return pieces, n
    return pieces, len(tokens)


def test_text_adds_up_to_a_plain_decode():
    tokens = ids("a b c ab ba a")
    checker = StopChecker(TOK, {TOK.eos_token_id}, (), 100)
    pieces, n = feed_all(checker, tokens)
    assert n == len(tokens) and checker.finish_reason is None
    assert "".join(pieces) == TOK.decode(tokens) == checker.text


def test_stop_token_ends_and_is_kept_in_ids_not_text():
    tokens = ids("a b") + [TOK.eos_token_id] + ids("c")
    checker = StopChecker(TOK, {TOK.eos_token_id}, (), 100)
    pieces, n = feed_all(checker, tokens)
    assert n == 3 and checker.finish_reason == STOP
    assert "".join(pieces) == "a b" and checker.token_ids == tokens[:3]


def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    tokens = ids("a b c ab ba")
    checker = StopChecker(TOK, set(), ("c ab",), 100)
    pieces, n = feed_all(checker, tokens)
    assert checker.finish_reason == STOP and n == 4
    assert "".join(pieces) == "a b " and checker.text == "a b "
    # "c" alone was held back (it may start the stop string): nothing streamed it early.
    assert all("c" not in p for p in pieces)


def test_held_back_text_is_released_when_it_is_not_a_stop():
    tokens = ids("a b c b")
    checker = StopChecker(TOK, set(), ("c ab",), 100)
    pieces, _ = feed_all(checker, tokens)
    assert checker.finish_reason is None and "".join(pieces) == "a b c b"


def test_max_tokens_flushes_held_text():
    checker = StopChecker(TOK, set(), ("b a",), 3)
    pieces, n = feed_all(checker, ids("a a b a"))
    assert n == 3 and checker.finish_reason == LENGTH
    assert "".join(pieces) == "a a b"
