"""A bad model path fails fast, with one line naming the role, the path and what is wrong,
in-process and before a private Ray is started for ``eft serve --local``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from eft_router.engine import Engine
from eft_router.roles.models import ModelPathError, check_model


def cases(tmp: Path, family_paths: dict[str, str]) -> dict[str, tuple[str, str]]:
    """name: (model path, what the error must say)."""
    empty = tmp / "empty"
    empty.mkdir()
    no_tokenizer = tmp / "no_tokenizer"
    shutil.copytree(family_paths["base_small"], no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    return {
        "missing": (str(tmp / "nope"), "not found (no such directory)"),
        "no_model": (str(empty), "not a model directory (no config.json)"),
        "no_tokenizer": (str(no_tokenizer), "no tokenizer in the directory"),
        "hub_offline": ("some-org/some-model", "not in the Hugging Face cache, and the hub is offline"),
    }


@pytest.fixture(scope="module")
def bad(tmp_path_factory, family_paths) -> dict[str, tuple[str, str]]:
    return cases(tmp_path_factory.mktemp("bad_models"), family_paths)


@pytest.mark.parametrize("case", ["missing", "no_model", "no_tokenizer", "hub_offline"])
def test_in_process_load_names_role_path_and_problem(bad, family_paths, case, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, problem = bad[case]
    started = time.monotonic()
    with pytest.raises(ModelPathError) as err:
        Engine.local({**family_paths, "base_large": path})
    assert time.monotonic() - started < 5
    assert str(err.value) == f"role 'base_large': model {path!r}: " + str(err.value).split(": ", 2)[2]
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_a_good_directory_passes(family_paths):
    for role, path in family_paths.items():
        check_model(role, path)


@pytest.mark.parametrize("how", ["--in-process", "--local"])
@pytest.mark.parametrize("case", ["missing", "no_tokenizer"])
def test_eft_serve_fails_fast_with_one_line(bad, family_paths, tmp_path, how, case):
    path, problem = bad[case]
    config = tmp_path / "ensemble.yaml"
    config.write_text(yaml.safe_dump({"roles": {**{r: {"model": p} for r, p in family_paths.items()}, "base_large": {"model": path}}}))
    eft = Path(sys.executable).parent / "eft"
    started = time.monotonic()
    out = subprocess.run([str(eft), "serve", how, "--config", str(config)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode != 0
    assert time.monotonic() - started < 30  # the imports; no Ray is started, nothing is deployed
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == f"error: role 'base_large': model {path!r}: " + lines[-1].split(": ", 3)[3], out.stderr
    assert problem in lines[-1]
