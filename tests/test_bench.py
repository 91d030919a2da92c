"""The engine benchmark as a user runs it: a separate process over given models, one short
round. Its figures are not checked (timing belongs to benchmarks, not tests), but its table
is: every row, and the perfect-drafter rows' defining property, acceptance exactly 1."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_engine.py"


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
