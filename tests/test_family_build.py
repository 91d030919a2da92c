"""The embedded family's pipeline end to end at miniature size: build, cache, load, evaluate."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from eft_router.cli import main
from eft_router.engine import Engine, GenerationRequest
from eft_router.family.build import MINIATURE, ROLES, adapter_ensemble, build_family, family_dir, read_manifest
from eft_router.family.train import Shape
from eft_router.core.spec import EFTSpec, SamplingParams
from eft_router.core.vocab import check_shared_vocabulary


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eft-cache")


@pytest.fixture(scope="module")
def mini_family(cache) -> dict[str, str]:
    return build_family(MINIATURE, root=cache, quiet=True)


def test_build_writes_every_role_and_a_manifest(mini_family, cache):
    directory = family_dir(MINIATURE, cache)
    assert set(mini_family) == set(ROLES)
    manifest = read_manifest(directory)
    assert manifest["digest"] == MINIATURE.digest() and set(manifest["stage_seconds"]) == {*ROLES, "lora"}
    probes = manifest["probes"]
    assert probes["fact_probes"] > 0
    for role in ("base_small", "base_large"):
        assert 0.0 <= probes[f"{role}_fact_accuracy"] <= 1.0 and probes[f"{role}_step_ms"] > 0
    tokenizers = {role: AutoTokenizer.from_pretrained(path) for role, path in mini_family.items()}
    vocab = check_shared_vocabulary(tokenizers)
    for role, path in mini_family.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.vocab_size == vocab
        assert model.config.eos_token_id == tokenizers[role].eos_token_id
    small = AutoModelForCausalLM.from_pretrained(mini_family["base_small"]).config
    large = AutoModelForCausalLM.from_pretrained(mini_family["base_large"]).config
    assert large.num_hidden_layers > small.num_hidden_layers
    chat = tokenizers["ft_small"].apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|assistant|>")


def test_cached_build_is_reused_and_force_rebuilds(mini_family, cache):
    directory = family_dir(MINIATURE, cache)
    stamp = (directory / "manifest.json").stat().st_mtime_ns
    assert build_family(MINIATURE, root=cache, quiet=True) == mini_family
    assert (directory / "manifest.json").stat().st_mtime_ns == stamp
    assert build_family(MINIATURE, root=cache, force=True, quiet=True) == mini_family
    assert (directory / "manifest.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in cache.iterdir()) == [directory.name]  # nothing left aside


def test_a_failed_build_leaves_nothing_that_loads(tmp_path):
    broken = replace(MINIATURE, large=Shape(hidden=30, layers=2, heads=4))  # 30 % 4 != 0: fails mid-build
    with pytest.raises(Exception):
        build_family(broken, root=tmp_path, quiet=True)
    assert not family_dir(broken, tmp_path).exists()
    assert list(tmp_path.iterdir()) == []  # the temporary build folder is gone too


def test_the_engine_serves_the_family(mini_family):
    import asyncio

    engine = Engine.local(mini_family)
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Where was Ada born?"}], tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer(ids, add_special_tokens=False)["input_ids"]
    deltas = {"ft_small": 0.5, "ft_small_safe": 0.5}
    g = asyncio.run(engine.generate(GenerationRequest(ids, eft=EFTSpec(deltas=deltas), sampling=SamplingParams(temperature=0.0, max_new_tokens=5))))
    assert 1 <= len(g.token_ids) <= 5


def test_the_lora_fine_tunes_are_adapters_of_base_small(mini_family, cache):
    """Saved by PEFT, LoRA on base_small's weights (not full copies), served as a group, and
    trained: each adapter moves the rows away from base_small's, the safe one from the helpful one's."""
    import asyncio

    import torch
    from peft import PeftConfig

    from eft_router.roles.interface import Member, ScoreItem
    from eft_router.roles.local import load_local_roles

    models, adapters = adapter_ensemble(family_dir(MINIATURE, cache))
    assert set(adapters) == {"ft_small", "ft_small_safe"} and set(models) == set(ROLES) - set(adapters)
    for adapter in adapters.values():
        config = PeftConfig.from_pretrained(adapter.path)
        assert config.peft_type == "LORA" and config.r == MINIATURE.lora_rank
        assert not (Path(adapter.path) / "model.safetensors").exists() and (Path(adapter.path) / "adapter_model.safetensors").exists()
    roles, tokenizer = load_local_roles(models, adapters=adapters)
    assert isinstance(roles["ft_small_safe"], Member)
    ids = tokenizer("Where was Ada born?", add_special_tokens=False)["input_ids"]
    rows = {r: asyncio.run(roles[r].score([ScoreItem(f"lora-{r}", ids, len(ids))]))[0] for r in ("base_small", *adapters)}
    assert (rows["ft_small"] - rows["base_small"]).abs().max() > 0.1
    assert (rows["ft_small_safe"] - rows["ft_small"]).abs().max() > 0.01
    assert torch.isfinite(rows["ft_small_safe"]).all()


def test_eval_report_has_every_section(mini_family, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EFT_CACHE_DIR", str(cache))
    main(["eval", "--miniature", "--quiet", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"meta", "two_by_two", "gap_recovered", "interpolation", "beta", "weight_top_p", "speculative"}
    for key in ("T=0", "T=1"):
        assert set(results["two_by_two"][key]) == {"small-ft (lower bound)", "large-ft (upper bound)", "EFT up-scaled", "EFT down-scaled"}
        assert [p["lambda"] for p in results["interpolation"][key]["up-scaled"]] == [0.0, 0.5, 1.0]
        assert set(results["interpolation"][key]) == {"small", "up-scaled"}
    lora = results["adapters"]
    for key in ("T=0", "T=1"):
        assert set(lora["two_by_two"][key]) == {"small-ft (lower bound)", "EFT up-scaled"}
        assert [p["lambda"] for p in lora["interpolation"][key]["up-scaled"]] == [0.0, 0.5, 1.0]
    spec = results["speculative"]["table"]
    assert {"plain EFT", "ft_small alone", "speculative k=1", "speculative k=2"} <= set(spec)
    assert all(0.0 <= t <= 1.0 for t in results["speculative"]["tv"]) and results["speculative"]["tv"]
    report = (tmp_path / "report.md").read_text()
    for heading in ("1. Scale decoupling", "2. Reward interpolation", "3a. Up-scaling amplification", "3b. Top-p filtering", "4. Speculative decoding", "5. The small fine-tunes as LoRA adapters"):
        assert heading in report
    for png in ("frontier.png", "tv_distance.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cache_key_follows_the_training_data(monkeypatch):
    """A family is found in the cache by its key: a change to the texts it is trained on
    must change the key, or an upgraded project would load models of the old data."""
    import eft_router.family.world as world

    before = MINIATURE.digest()
    assert MINIATURE.digest() == before and replace(MINIATURE, seed=1).digest() != before
    monkeypatch.setattr(world, "REFUSAL", "No.")  # only the preference pairs' text changes
    assert MINIATURE.digest() != before


def test_concurrent_builds_take_turns(tmp_path, monkeypatch):
    """A second build of the same family while the first runs (another process, or here a
    thread) waits for it and returns the family it built, instead of racing it to the
    final rename; nothing is left aside."""
    import threading

    from eft_router.family import build as build_module

    building, builds = threading.Event(), []
    real = build_module._build

    def counted(*args, **kwargs):
        builds.append(threading.current_thread().name)
        building.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "_build", counted)
    results = {}

    def run(name: str) -> None:
        results[name] = build_family(MINIATURE, root=tmp_path, quiet=True)

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert building.wait(120)  # the first is building; the second starts now
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    first.join(600)
    second.join(600)
    assert builds == ["first"] and results["first"] == results["second"]
    assert [p.name for p in tmp_path.iterdir()] == [family_dir(MINIATURE, tmp_path).name]
