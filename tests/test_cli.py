"""The ``eft`` command line, run in-process on the tiny family."""

from __future__ import annotations

import json

import pytest

from eft_router.cli import main
from eft_router.engine import GenerationRequest


def model_args(paths: dict[str, str]) -> list[str]:
    return [a for role in ("base_large", "base_small", "ft_small") for a in ("--model", f"{role}={paths[role]}")]


def test_generate_json_matches_the_engine(family_paths, engine, capsys):
    import asyncio

    from eft_router.core.spec import SamplingParams, SpeculativeParams

    main(["generate", *model_args(family_paths), "w1 w2", "--temperature", "0", "--max-tokens", "6", "-k", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    ids = engine.tokenizer("w1 w2")["input_ids"]
    g = asyncio.run(engine.generate(GenerationRequest(ids, sampling=SamplingParams(temperature=0.0, max_new_tokens=6), speculative=SpeculativeParams(k=3))))
    assert out["token_ids"] == g.token_ids and out["text"] == g.text
    assert out["stats"]["blocks"] == g.stats.blocks and len(out["diagnostics"]) == len(g.token_ids)


def test_stream_and_score(family_paths, capsys):
    main(["generate", *model_args(family_paths), "w1 w2", "--seed", "1", "--max-tokens", "5"])
    captured = capsys.readouterr()
    assert len(captured.out.split()) >= 1 and "seed 1" in captured.err
    main(["score", *model_args(family_paths), "--prompt", "w1 w2", "w3 w4"])
    scored = json.loads(capsys.readouterr().out)
    assert len(scored["logprobs"]) == 2 and set(scored["role_logprobs"]) == {"base_large", "base_small", "ft_small"}


@pytest.mark.parametrize(
    "extra,message",
    [(["--temperature", "-1"], "sampling.temperature"), (["--delta", "ft_x=1"], "eft.deltas.ft_x"), (["--weight-top-p", "0"], "eft.weight_top_p")],
)
def test_bad_arguments_exit_with_the_field(family_paths, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(["generate", *model_args(family_paths), "w1", *extra])
