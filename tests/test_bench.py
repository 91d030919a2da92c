"""The benchmarks as a user runs them: separate processes, one short round. Their figures are
not checked (timing belongs to benchmarks, not tests), but their tables are: the engine
benchmark's every row and the perfect-drafter rows' defining property, acceptance exactly 1;
the others' rows and the figures fixed by design."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
BENCH = BENCH_DIR / "bench_engine.py"


def test_bench_engine_prints_every_row_and_a_perfect_drafter_is_never_rejected(family_paths):
    models = [f"--model={r}={family_paths[r]}" for r in ("base_large", "base_small", "ft_small")]
    args = [sys.executable, str(BENCH), *models, "--rounds", "1", "--max-k", "2", "--tokens", "6"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = dict(re.findall(r"^((?:\w+ )*(?:alone|EFT|k=\d))\s+[\d.]+\s+[\d.]+x\s+(\S+)", out, flags=re.MULTILINE))
    names = ["ft_small alone", "base_large alone", "plain EFT"]
    names += [f"{kind} k={k}" for kind in ("speculative EFT", "perfect drafter") for k in (1, 2)]
    assert list(rows) == names, out
    assert [rows[f"perfect drafter k={k}"] for k in (1, 2)] == ["1.000", "1.000"], out
    assert all(0.0 <= float(rows[f"speculative EFT k={k}"]) <= 1.0 for k in (1, 2)), out
    assert re.search(r"best perfect drafter k=\d: [\d.]+x plain EFT", out), out
    assert re.search(r"plain EFT [\d.]+ tok/s vs bound .* [\d]+% of the bound", out), out


def test_the_perfect_drafter_calls_every_role():
    """Its rows are a ceiling only if they pay for the same role calls as speculative EFT."""
    spec = importlib.util.spec_from_file_location("bench_engine", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(bench.PERFECT_DRAFTER.resolve(list(bench.ROLES)).roles) == set(bench.ROLES)


# The other benchmarks, each as a user runs it on its synthetic models, in the shortest
# form its options allow (about 1.5 minutes in all): a benchmark that nobody runs breaks
# unseen (bench_adapters once did, when a function it shares changed). Each check reads a
# figure whose value is fixed by the design, not by timing, or the line that summarises a run.
SMOKE = {
    "bench_serve.py": (
        ["--rounds", "1", "--streams", "1", "2", "--ks", "2", "--max-tokens", "4"],
        [r"^\s+2\s+k=2 \|", r"Serve / in-process at 2 stream\(s\): plain [\d.]+, k=4 [\d.]+"],
    ),
    "bench_adapters.py": (  # a co-served group answers a plain step in 2 calls instead of 3
        ["--rounds", "1", "--streams", "1", "--max-tokens", "4"],
        [r"^\s+1\s+plain\s+Serve \|.*\|\s+3\.00\s+2\.00$", r"^\s+1\s+k=4\s+in-process \|.*\|\s+3\.00\s+2\.00$"],
    ),
    "bench_fronts.py": (
        ["--rounds", "1", "--streams", "1", "--max-tokens", "4"],
        [r"^\s+1\s+k=4 \|(\s+[\d.]+\s+[\d.]+ \|){4}(\s+[\d.]+){3}$", r"^\s+1\s+plain \|\s+[\d.]+ / [\d.]+"],
    ),
    "bench_steps.py": (["--lengths", "32", "64", "--sessions", "2", "--repeats", "2"], [r"^\s+32\s+[\d.]+", r"^\s+64\s+[\d.]+"]),
    "tree_coverage.py": (["--prompts", "2", "--samples", "1", "--tokens", "8"], [r"^\s+0\.50\s+[\d.]+%(\s+[\d.]+){9}$"]),
    "soak.py": (  # 4 streams: one of them on the OpenAI HTTP API
        ["--minutes", "0.15", "--streams", "4", "--report-every", "3"],
        [r"^unexpected errors: 0$", r"gRPC OK \d+", r"HTTP OK \d+"],
    ),
}


@pytest.mark.parametrize("script", list(SMOKE))
def test_benchmark_runs_and_prints_its_table(script: str, tmp_path: Path):
    args, patterns = SMOKE[script]
    ray_dir = tempfile.mkdtemp(prefix="eft-b-")  # its own private Ray, apart from the suite's (short: unix socket paths)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")} | {"RAY_TMPDIR": ray_dir}
    try:
        run = subprocess.run([sys.executable, str(BENCH_DIR / script), *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for pattern in patterns:
        assert re.search(pattern, run.stdout, flags=re.MULTILINE), f"{pattern!r} not in:\n{run.stdout}"
