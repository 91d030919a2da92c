"""Fine-tunes as LoRA adapters co-served with their base: a group's rows equal those of the
same adapters merged into separately loaded models, EFT outputs equal the merged ensemble's,
a speculative block calls two backends instead of three, and bad adapters are refused with
errors that name the role."""

from __future__ import annotations

import asyncio
import json
import re
import shutil

import pytest
import torch

from eft_router.core.spec import EFTSpec, SamplingParams, SpeculativeParams
from eft_router.engine import Engine, GenerationRequest
from eft_router.roles.adapters import Adapter, AdapterError
from eft_router.roles.interface import DraftItem, DraftParams, Member, ScoreItem
from eft_router.roles.local import load_local_roles
from eft_router.roles.worker import RoleWorker
from eft_router.tiny import TinyModel, build_tiny_family, tiny_lora

from conftest import KV_CACHE_BYTES, WORDS

V = len(WORDS) + 2
MEMBERS = ("base_small", "ft_small", "ft_safe")


@pytest.fixture(scope="module")
def workers(family_paths, adapter_paths):
    """The co-served group, and each member as its own model (the adapters merged)."""
    base = family_paths["base_small"]
    group = RoleWorker("base_small", base, V, kv_cache_bytes=KV_CACHE_BYTES, adapters=adapter_paths["adapters"])
    refs = {"base_small": RoleWorker("base_small", base, V, kv_cache_bytes=KV_CACHE_BYTES)}
    refs.update({r: RoleWorker(r, p, V, kv_cache_bytes=KV_CACHE_BYTES) for r, p in adapter_paths["merged"].items()})
    return group, refs


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_the_adapters_change_the_rows(workers):
    """Not a vacuous equality: each adapter's rows differ from the base's."""
    _, refs = workers
    ids = _ids(12, 0)
    rows = {r: w.score([ScoreItem("vacuous", ids, 12)])[0] for r, w in refs.items()}
    for r in ("ft_small", "ft_safe"):
        assert (rows[r] - rows["base_small"]).abs().max() > 0.05
        refs[r].release(["vacuous"])
    refs["base_small"].release(["vacuous"])


def test_group_rows_equal_merged_models_in_one_pass(workers):
    """Prefills and cached decodes of several sessions, every member mixed in each call:
    one forward pass per call, every row within 1e-5 of the member's merged model."""
    group, refs = workers
    a, b = _ids(30, 1), _ids(30, 2)
    steps = [
        [ScoreItem("a", a[:10], 10, role=r) for r in MEMBERS] + [ScoreItem("b", b[:7], 3, role="ft_safe")],
        [ScoreItem("a", a[:14], 4, role=r) for r in MEMBERS] + [ScoreItem("b", b[:12], 5, role="ft_safe"), ScoreItem("b", b[:9], 2, role="ft_small")],
        [ScoreItem("a", a[:11] + [5, 6], 2, role=r) for r in MEMBERS],  # rolled back, then new tokens
    ]
    try:
        for items in steps:
            passes = group.forward_passes
            out = group.score(items)
            assert group.forward_passes - passes == 1
            for item, rows in zip(items, out):
                (ref,) = refs[item.role].score([ScoreItem(item.session_id, item.token_ids, item.rows)])
                assert rows.shape == ref.shape
                assert (rows - ref).abs().max() < 1e-5, (item.role, item.session_id)
    finally:
        group.release(["a", "b"])
        for w in refs.values():
            w.release(["a", "b"])
    assert group.session_ids() == []


def test_group_rows_equal_pefts_own_mixed_batch(workers, family_paths, adapter_paths):
    """The group's forward pass is our own mixed-batch LoRA: it equals PEFT's
    (``adapter_names`` per row, ``__base__`` for the base) on the same rows."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    group, _ = workers
    paths = adapter_paths["adapters"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(family_paths["base_small"]), paths["ft_small"], adapter_name="ft_small")
    peft.load_adapter(paths["ft_safe"], adapter_name="ft_safe")
    peft.eval()
    ids = _ids(12, 5)
    with torch.inference_mode():
        logits = peft(input_ids=torch.tensor([ids] * 3), adapter_names=["__base__", "ft_small", "ft_safe"]).logits
    want = torch.log_softmax(logits[..., :V].float(), dim=-1)
    try:
        got = group.score([ScoreItem("peft", ids, len(ids), role=r) for r in MEMBERS])
        for i, rows in enumerate(got):
            assert (rows - want[i]).abs().max() < 1e-5, MEMBERS[i]
    finally:
        group.release(["peft"])


def test_drafting_returns_the_other_members_rows(workers):
    """The drafter's tokens equal its merged model's draft, and each ``also`` member's rows
    at the drafted positions equal its merged model's scores there, in the drafter's passes."""
    group, refs = workers
    ids = _ids(9, 3)
    params, uniforms = DraftParams(temperature=0.9), [0.2, 0.7, 0.4, 0.9]
    try:
        passes = group.forward_passes
        (d,) = group.draft([DraftItem("d", ids, 4, params, uniforms, role="ft_small", also=("base_small", "ft_safe"))])
        assert group.forward_passes - passes == 1 + len(d.tokens)
        (ref,) = refs["ft_small"].draft([DraftItem("d", ids, 4, params, uniforms)])
        assert d.tokens == ref.tokens and len(d.tokens) == 4
        assert (d.logprobs - ref.logprobs).abs().max() < 1e-5
        assert set(d.others) == {"base_small", "ft_safe"}
        for role, rows in d.others.items():
            (want,) = refs[role].score([ScoreItem("d", ids + d.tokens, len(d.tokens) + 1)])
            assert (rows - want).abs().max() < 1e-5, role
    finally:
        group.release(["d"])
        for w in refs.values():
            w.release(["d"])


def test_group_items_are_validated(workers):
    group, _ = workers
    with pytest.raises(ValueError, match=r"items\[0\].role: must be one of the roles this worker serves \(base_small, ft_small, ft_safe\), got 'ft_other'"):
        group.score([ScoreItem("x", [2, 3], 1, role="ft_other")])
    with pytest.raises(ValueError, match=r"items\[0\].also: 'ft_small' must be another role"):
        group.draft([DraftItem("x", [2, 3], 2, DraftParams(), [0.5, 0.5], role="ft_small", also=("ft_small",))])
    assert group.session_ids() == []


@pytest.fixture(scope="module")
def engines(family_paths, adapter_paths):
    """The same ensemble twice: adapter roles co-served with base_small, and merged models."""
    full = {"base_large": family_paths["base_large"], "base_small": family_paths["base_small"]}
    adapters = {r: Adapter(p, "base_small") for r, p in adapter_paths["adapters"].items()}
    roles, tokenizer = load_local_roles(full, adapters=adapters, kv_cache_bytes=KV_CACHE_BYTES)
    assert isinstance(roles["ft_small"], Member) and roles["ft_small"].group is roles["ft_safe"].group
    merged = Engine.local({**full, **adapter_paths["merged"]}, kv_cache_bytes=KV_CACHE_BYTES)
    return Engine(roles, tokenizer), merged


CASES = [
    (EFTSpec(), SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)),
    (EFTSpec(), SamplingParams(temperature=1.0, seed=7, max_new_tokens=24, ignore_eos=True)),
    (EFTSpec(deltas={"ft_small": 0.6, "ft_safe": 0.4}, beta=1.5), SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=24, ignore_eos=True)),
    (EFTSpec(preset="interpolate", deltas={"ft_small": 0.5, "ft_safe": 0.5}), SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)),
]


@pytest.mark.parametrize("k", [0, 4])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_eft_outputs_equal_the_merged_ensemble(engines, case, k):
    adapter, merged = engines
    eft, sampling = CASES[case]

    async def both() -> tuple:
        requests = [GenerationRequest(p, eft=eft, sampling=sampling, speculative=SpeculativeParams(k=k), logprobs=0) for p in ([4, 5, 6], [9, 9, 10, 11])]
        a = await asyncio.gather(*(adapter.generate(r) for r in requests))
        m = await asyncio.gather(*(merged.generate(r) for r in requests))
        return a, m

    a, m = asyncio.run(both())
    for x, y in zip(a, m):
        assert x.token_ids == y.token_ids and len(x.token_ids) == 24
        assert max(abs(p.logprob - q.logprob) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4


def _calls_per_block(engine: Engine, k: int) -> tuple[float, dict]:
    before, steps = engine.role_calls.copy(), engine.steps
    asyncio.run(engine.generate(GenerationRequest([4, 5, 6], sampling=SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True), speculative=SpeculativeParams(k=k))))
    calls = {key: n - before[key] for key, n in engine.role_calls.items() if key[1] != "release" and n - before[key]}
    return sum(calls.values()) / (engine.steps - steps), calls


def test_a_speculative_block_calls_two_backends_not_three(engines):
    """Up-scaling with speculative drafting: base_large scores, the small group drafts and
    returns base_small's rows with the draft. Merged: a draft call and two score calls."""
    adapter, merged = engines
    per_step, calls = _calls_per_block(adapter, 4)
    assert per_step == 2, calls
    assert set(calls) == {("base_large", "score"), ("base_small+ft_small+ft_safe", "draft"), ("base_small+ft_small+ft_safe", "score")}
    assert _calls_per_block(merged, 4)[0] == 3
    assert _calls_per_block(adapter, 0)[0] == 2 and _calls_per_block(merged, 0)[0] == 3


# -- bad adapters ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_adapters(family_paths, adapter_paths, tmp_path_factory):
    """One broken adapter directory per way an adapter can fail to fit base_small."""
    root = tmp_path_factory.mktemp("bad-adapters")
    good = adapter_paths["adapters"]["ft_small"]
    out = {"empty": str(root / "empty")}
    (root / "empty").mkdir()

    def edited(name: str, change) -> str:
        path = root / name
        shutil.copytree(good, path)
        config = json.loads((path / "adapter_config.json").read_text())
        change(config)
        (path / "adapter_config.json").write_text(json.dumps(config))
        return str(path)

    out["not_lora"] = edited("not_lora", lambda c: c.update(peft_type="IA3"))
    out["dora"] = edited("dora", lambda c: c.update(use_dora=True))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    saved = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(family_paths["base_small"]), saved).save_pretrained(root / "saved_modules")
    out["saved_modules"] = str(root / "saved_modules")
    out["no_targets"] = edited("no_targets", lambda c: c.update(target_modules=["no_such_proj"]))
    other = build_tiny_family(root / "other", WORDS, {"base_other": TinyModel(hidden=48, layers=1, seed=9)})["base_other"]
    out["other_base"] = tiny_lora(other, root / "other_base", 1)
    moved = root / "moved_other_base"  # trained on another model, which is no longer on disk
    shutil.copytree(out["other_base"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/model"}))
    out["moved_other_base"] = str(moved)
    renamed = build_tiny_family(root / "words", [f"v{i}" for i in range(len(WORDS))], {"x": TinyModel()})["x"]
    out["other_vocab"] = edited("other_vocab", lambda c: None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{renamed}/{name}", f"{out['other_vocab']}/{name}")
    return out


BAD = {
    "empty": "not a PEFT adapter directory \\(no adapter_config.json\\)",
    "not_lora": "only LoRA adapters can be co-served, this one is 'IA3'",
    "dora": "uses a LoRA variant \\(DoraLinearVariant\\): only plain LoRA can be co-served",
    "saved_modules": "saves whole modules \\(lm_head\\): only LoRA updates of linear layers can be co-served",
    "no_targets": "does not fit the model of base role 'base_small'.*no_such_proj",
    "other_base": "was trained on .*, a different model from base role 'base_small'.*hidden_size 48 vs 32",
    "moved_other_base": "does not fit the model of base role 'base_small'.*size mismatch",
    "other_vocab": "its tokenizer differs from that of base role 'base_small'",
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_adapters_get_their_error(family_paths, bad_adapters, bad):
    with pytest.raises(AdapterError, match=f"role 'ft_small': adapter '.*{bad}': {BAD[bad]}"):
        load_local_roles({"base_small": family_paths["base_small"]}, adapters={"ft_small": Adapter(bad_adapters[bad], "base_small")})


def test_bad_adapter_roles_get_their_error(family_paths, adapter_paths):
    path = adapter_paths["adapters"]["ft_small"]
    with pytest.raises(ValueError, match="role 'ft_small': base must be a role with a model of its own \\(base_small\\), got 'base_large'"):
        load_local_roles({"base_small": family_paths["base_small"]}, adapters={"ft_small": Adapter(path, "base_large")})
    with pytest.raises(ValueError, match="role 'ft_small': give a model or an adapter, not both"):
        load_local_roles({"base_small": family_paths["base_small"], "ft_small": family_paths["ft_small"]}, adapters={"ft_small": Adapter(path, "base_small")})


# -- the config, and the Serve backend -------------------------------------------------------------


def _config(family_paths, adapter_paths, **extra):
    from services.config import EnsembleConfig

    roles = {
        "base_small": {"model": family_paths["base_small"], "kv_cache_bytes": KV_CACHE_BYTES, "ray_actor_options": {"num_cpus": 0.5}},
        **{r: {"adapter": p, "base": "base_small"} for r, p in adapter_paths["adapters"].items()},
    }
    for role, fields in extra.items():
        roles[role] = fields
    return EnsembleConfig.model_validate({"roles": roles, "app_prefix": "lora-"})


def test_config_serves_a_group_from_its_base_deployment(family_paths, adapter_paths):
    config = _config(family_paths, adapter_paths)
    (app,) = config.to_serve_config()["applications"]
    assert app["name"] == "lora-base_small" and app["args"]["adapters"] == adapter_paths["adapters"]
    assert config.served_by() == {"ft_small": "base_small", "ft_safe": "base_small"}
    assert config.tokenizer_path() == family_paths["base_small"]  # the drafter ft_small is an adapter: its base's


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"adapter": "x"}, "(?s)roles.ft_small.*adapter and base: an adapter role gives both"),
        ({"model": "m", "adapter": "x", "base": "base_small"}, "(?s)roles.ft_small.*model and adapter: give one of them"),
        ({"adapter": "x", "base": "ft_safe"}, "role 'ft_small': base must be a role with a model of its own \\(base_small\\), got 'ft_safe'"),
        ({"adapter": "x", "base": "base_small", "num_replicas": 2, "dtype": "bfloat16"}, "dtype, num_replicas: an adapter role is served by its base's deployment \\(base_small\\); set them there"),
    ],
)
def test_bad_adapter_configs_name_the_field(family_paths, adapter_paths, fields, error):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=error):
        _config(family_paths, adapter_paths, ft_small=fields)


def test_an_adapter_on_a_sharded_base_is_refused(family_paths, adapter_paths):
    from pydantic import ValidationError

    base = {"model": family_paths["base_small"], "tp_size": 2}
    with pytest.raises(ValidationError, match="role 'ft_s.*': base role 'base_small' has tp_size 2; adapters are co-served only with an unsharded base"):
        _config(family_paths, adapter_paths, base_small=base)


@pytest.fixture(scope="module")
def served_group(ray_cluster, served_ensemble, family_paths, adapter_paths):
    """The small group deployed as one Serve application, and the shared ensemble's
    base_large: an adapter ensemble through Serve."""
    from ray import serve

    from eft_router.roles.serve import connect_serve_roles
    from services.app import deploy_ensemble

    config = _config(family_paths, adapter_paths)
    deploy_ensemble(config)
    try:
        roles = connect_serve_roles(list(config.roles), app_prefix="lora-", served_by=config.served_by())
        yield {**connect_serve_roles(["base_large"]), **roles}
    finally:
        serve.delete("lora-base_small")


@pytest.mark.parametrize("k", [0, 4])
def test_served_adapter_roles_equal_the_merged_ensemble(served_group, engines, k):
    """Through Serve, the co-served group gives the merged ensemble's outputs (greedy and
    seeded), with two backend calls per step."""
    _, merged = engines
    served = Engine(served_group, merged.tokenizer)
    assert isinstance(served_group["ft_safe"], Member)
    for eft, sampling in CASES[:3]:
        request = GenerationRequest([4, 5, 6], eft=eft, sampling=sampling, speculative=SpeculativeParams(k=k))
        assert asyncio.run(served.generate(request)).token_ids == asyncio.run(merged.generate(request)).token_ids
    assert _calls_per_block(served, k)[0] == 2


def test_a_bad_adapter_fails_its_deployment_with_the_error(ray_cluster, family_paths, bad_adapters):
    """What can be told without loading fails before deploying (``check_models``, as
    ``eft serve`` runs it); an adapter that loads but does not fit fails its replica, and
    Serve's status carries the adapter's error."""
    from ray import serve

    from eft_router.roles.serve import DEPLOYMENT_NAME
    from services.app import deploy_ensemble
    from services.config import EnsembleConfig
    from services.launch import check_models

    for bad in ("empty", "not_lora", "other_base"):
        config = _config(family_paths, {"adapters": {"ft_small": bad_adapters[bad]}})
        with pytest.raises(AdapterError, match=f"role 'ft_small': adapter .*{bad}': {BAD[bad]}"):
            check_models(config)

    config = EnsembleConfig.model_validate(
        {
            "roles": {
                "base_small": {"model": family_paths["base_small"], "kv_cache_bytes": KV_CACHE_BYTES, "ray_actor_options": {"num_cpus": 0.5}},
                "ft_small": {"adapter": bad_adapters["no_targets"], "base": "base_small"},
            },
            "app_prefix": "badlora-",
        }
    )
    check_models(config)
    try:
        with pytest.raises(Exception, match="Deploying application badlora-base_small failed"):
            deploy_ensemble(config)
        status = serve.status().applications["badlora-base_small"].deployments[DEPLOYMENT_NAME]
        assert re.search("role 'ft_small': adapter .*no_targets.*does not fit the model of base role 'base_small'", status.message), status.message
    finally:
        serve.delete("badlora-base_small")


def test_the_cli_runs_adapter_roles(family_paths, adapter_paths, capsys):
    from eft_router.cli import main

    full = ["--model", f"base_large={family_paths['base_large']}", "--model", f"base_small={family_paths['base_small']}"]
    ask = ["w1 w2", "--temperature", "0", "--max-tokens", "6", "-k", "3", "--json"]
    main(["generate", *full, "--adapter", f"ft_small=base_small:{adapter_paths['adapters']['ft_small']}", *ask])
    adapter = json.loads(capsys.readouterr().out)
    main(["generate", *full, "--model", f"ft_small={adapter_paths['merged']['ft_small']}", *ask])
    assert adapter["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]
    with pytest.raises(SystemExit, match="--adapter: expected ROLE=BASE:PATH"):
        main(["generate", *full, "--adapter", "ft_small=nobase", *ask])
