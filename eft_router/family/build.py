"""Build (or find in the cache) the embedded model family.

Five roles, trained from nothing on the synthetic world: ``base_small`` and ``base_large``
pre-trained on one corpus, ``ft_small`` and ``ft_large`` chat fine-tuned on a training subset
of entities, ``ft_small_safe`` = ``ft_small`` tuned (supervised on the preferred answers,
then DPO) to refuse the harmful category. The small fine-tunes are also trained the same
way as PEFT LoRA adapters of ``base_small`` (``ft_small_lora``, ``ft_small_safe_lora``:
:func:`adapter_paths`), for the co-served adapter ensemble.
The small chain and the large chain train in two processes, one core each.

The family is cached under ``$EFT_CACHE_DIR`` (default ``~/.cache/eft-router``) in a folder
keyed by the family version and a digest of the config and the training data. A build
writes into a hidden temporary folder and renames it into place only when complete
(``manifest.json`` written last), so an interrupted build never leaves a family that later
loads.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from ..roles.adapters import Adapter
from .probes import decode_step_seconds, fact_accuracy
from .tokenizer import CHAT_TEMPLATE, train_tokenizer
from .train import Schedule, Shape, dpo, new_model, pretrain, sft
from .world import build_world, eval_prompts, preference_pairs, pretraining_corpus, sft_examples

FAMILY_VERSION = 3
ROLES = ("base_large", "base_small", "ft_small", "ft_large", "ft_small_safe")
ADAPTERS = {"ft_small": "ft_small_lora", "ft_small_safe": "ft_small_safe_lora"}  # role -> LoRA directory
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FamilyConfig:
    seed: int = 0
    n_entities: int = 400
    vocab_size: int = 1024
    small: Shape = Shape(hidden=48, layers=1)
    large: Shape = Shape(hidden=64, layers=10)
    pretrain_small: Schedule = Schedule(steps=600)
    pretrain_large: Schedule = Schedule(steps=1500)
    sft: Schedule = Schedule(steps=260, lr=1e-3)
    safe_sft: Schedule = Schedule(steps=120, lr=1e-3)
    dpo: Schedule = Schedule(steps=120, batch_size=16, lr=2e-4, warmup=10)
    dpo_beta: float = 0.1
    lora_rank: int = 8  # the LoRA fine-tunes: rank, and their learning rates as multiples of the full ones'
    lora_lr_scale: float = 3.0

    def digest(self) -> str:
        """The cache key: the config, the family version, and the data and chat template
        themselves (about 0.1 s), so that a change to the world's texts never loads a family
        trained on the old ones. Training code changes still need a FAMILY_VERSION bump."""
        world, lines = _data(self)
        data = [lines, sft_examples(world, seed=self.seed), preference_pairs(world, seed=self.seed), CHAT_TEMPLATE]
        blob = json.dumps({"version": FAMILY_VERSION, "data": data, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


DEFAULT = FamilyConfig()
# Seconds, not minutes: the whole pipeline at toy sizes, for the test suite.
MINIATURE = FamilyConfig(
    n_entities=40,
    vocab_size=400,
    small=Shape(hidden=16, layers=1, heads=2),
    large=Shape(hidden=32, layers=2),
    pretrain_small=Schedule(steps=30, batch_size=8),
    pretrain_large=Schedule(steps=30, batch_size=8),
    sft=Schedule(steps=30, batch_size=8, lr=1e-3),
    safe_sft=Schedule(steps=10, batch_size=8, lr=1e-3),
    dpo=Schedule(steps=10, batch_size=4, lr=5e-4, warmup=2),
    lora_rank=4,
)


def cache_root() -> Path:
    return Path(os.environ.get("EFT_CACHE_DIR") or Path.home() / ".cache" / "eft-router")


def family_dir(config: FamilyConfig = DEFAULT, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"family-v{FAMILY_VERSION}-{config.digest()}"


def role_paths(directory: Path) -> dict[str, str]:
    return {role: str(directory / role) for role in ROLES}


def adapter_paths(directory: Path) -> dict[str, Adapter]:
    """The LoRA fine-tunes as adapter roles of ``base_small``."""
    return {role: Adapter(str(directory / name), "base_small") for role, name in ADAPTERS.items()}


def adapter_ensemble(directory: Path) -> tuple[dict[str, str], dict[str, Adapter]]:
    """The family with its small fine-tunes as LoRA adapters: the roles with models of their
    own, and the adapter roles (``load_local_roles``' two arguments)."""
    adapters = adapter_paths(directory)
    return {r: p for r, p in role_paths(directory).items() if r not in adapters}, adapters


def _data(config: FamilyConfig):
    world = build_world(config.seed, config.n_entities)
    lines = pretraining_corpus(world, seed=config.seed)
    return world, lines


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _tune_safe(model, tokenizer, world, config: FamilyConfig, seed: int, lr_scale: float, desc: str, quiet: bool) -> None:
    """SFT on the preferred answers first, then DPO against that SFT model: on a model this
    small DPO alone moves too little to refuse reliably. ``lr_scale`` multiplies both
    stages' learning rates (LoRA's)."""
    pairs = preference_pairs(world, seed=config.seed)
    chosen = [(question, preferred) for question, preferred, _ in pairs]
    sft(model, tokenizer, chosen, replace(config.safe_sft, lr=config.safe_sft.lr * lr_scale), seed, desc=f"SFT {desc}", quiet=quiet)
    schedule = replace(config.dpo, lr=config.dpo.lr * lr_scale)
    dpo(model, copy.deepcopy(model), tokenizer, pairs, schedule, seed, beta=config.dpo_beta, desc=f"DPO {desc}", quiet=quiet)


def _train_adapters(base, tokenizer, world, config: FamilyConfig, out: Path, seed: int, quiet: bool) -> None:
    """ft_small and ft_small_safe again, as LoRA adapters of ``base`` (its weights frozen):
    the same data, stages and steps, at ``lora_lr_scale`` times the learning rates."""
    from peft import LoraConfig, get_peft_model

    from ..tiny import LORA_TARGETS

    torch.manual_seed(seed)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, target_modules=list(LORA_TARGETS))
    helpful = get_peft_model(copy.deepcopy(base), lora)
    sft(helpful, tokenizer, sft_examples(world, seed=config.seed), replace(config.sft, lr=config.sft.lr * config.lora_lr_scale), seed,
        desc="fine-tune ft_small (LoRA)", quiet=quiet)
    _save(helpful, tokenizer, out / ADAPTERS["ft_small"])
    _tune_safe(helpful, tokenizer, world, config, seed, config.lora_lr_scale, "ft_small_safe (LoRA)", quiet)
    _save(helpful, tokenizer, out / ADAPTERS["ft_small_safe"])


def _train_chain(chain: str, config: FamilyConfig, out: Path, quiet: bool) -> dict[str, float]:
    """One process: pre-train a base, fine-tune it; for the small chain also DPO, and the
    LoRA fine-tunes. Returns the seconds each stage took."""
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    world, lines = _data(config)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    shape, schedule = (config.small, config.pretrain_small) if chain == "small" else (config.large, config.pretrain_large)
    timings = {}
    seed = config.seed + (1 if chain == "small" else 2)

    t = time.perf_counter()
    base = new_model(tokenizer, shape, seed)
    pretrain(base, tokenizer, lines, schedule, seed, desc=f"pre-train base_{chain}", quiet=quiet)
    _save(base, tokenizer, out / f"base_{chain}")
    timings[f"base_{chain}"] = time.perf_counter() - t

    t = time.perf_counter()
    ft = copy.deepcopy(base)
    sft(ft, tokenizer, sft_examples(world, seed=config.seed), config.sft, seed, desc=f"fine-tune ft_{chain}", quiet=quiet)
    _save(ft, tokenizer, out / f"ft_{chain}")
    timings[f"ft_{chain}"] = time.perf_counter() - t

    if chain == "small":
        t = time.perf_counter()
        safe = copy.deepcopy(ft)
        _tune_safe(safe, tokenizer, world, config, seed, 1.0, "ft_small_safe", quiet)
        _save(safe, tokenizer, out / "ft_small_safe")
        timings["ft_small_safe"] = time.perf_counter() - t

        t = time.perf_counter()
        _train_adapters(base, tokenizer, world, config, out, seed, quiet)
        timings["lora"] = time.perf_counter() - t
    return timings


def _probe(config: FamilyConfig, world, directory: Path) -> dict:
    """Fact accuracy of both bases on held-out fact probes, and their decode step times."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory / "base_small")
        n = min(200, 3 * len(world.eval_entities()))
        facts = [p for p in eval_prompts(world, n_per_category=n, seed=config.seed) if p.category == "fact"]
        out: dict = {"fact_probes": len(facts)}
        for role in ("base_small", "base_large"):
            model = AutoModelForCausalLM.from_pretrained(directory / role).eval()
            out[f"{role}_fact_accuracy"] = round(fact_accuracy(model, tokenizer, facts), 3)
            out[f"{role}_step_ms"] = round(1e3 * decode_step_seconds(model), 3)
    finally:
        torch.set_num_threads(threads)
    out["step_ratio"] = round(out["base_large_step_ms"] / out["base_small_step_ms"], 2)
    small_acc = out["base_small_fact_accuracy"]
    out["fact_accuracy_ratio"] = round(out["base_large_fact_accuracy"] / small_acc, 2) if small_acc else None
    return out


def build_family(
    config: FamilyConfig = DEFAULT, root: Path | None = None, force: bool = False, quiet: bool = False
) -> dict[str, str]:
    """Return role -> model directory, building the family first if it is not cached.
    Concurrent builds (two processes, the same cache) take turns: the later one finds the
    family the first one built."""
    target = family_dir(config, root)
    if (target / MANIFEST).exists() and not force:
        return role_paths(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent):
        if (target / MANIFEST).exists() and not force:
            return role_paths(target)
        return _build(config, target, quiet)


@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory`` (flock on its file descriptor: released when the
    holder exits, however it exits)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build(config: FamilyConfig, target: Path, quiet: bool) -> dict[str, str]:
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        started = time.perf_counter()
        world, lines = _data(config)
        train_tokenizer(lines, config.vocab_size).save_pretrained(work / "tokenizer")
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_train_chain, ("large", "small"), [config] * 2, [work] * 2, [quiet] * 2))
        timings = {k: round(v, 1) for r in results for k, v in r.items()}
        shutil.rmtree(work / "tokenizer")
        probes = _probe(config, world, work)
        manifest = {
            "version": FAMILY_VERSION,
            "config": asdict(config),
            "digest": config.digest(),
            "roles": list(ROLES),
            "adapters": ADAPTERS,
            "seconds": round(time.perf_counter() - started, 1),
            "stage_seconds": timings,
            "probes": probes,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():  # --force: move the old family aside, then swap in the new one
            old = target.with_name(target.name + f".old-{os.getpid()}")
            target.rename(old)
            shutil.rmtree(old)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return role_paths(target)


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())
