"""The ``eft`` service commands as a user runs them: separate processes, real signals.

``eft demo --tiny`` is what ``make demo`` runs, on random tiny models instead of the
embedded family (whose build is kept out of the suite): its own private Ray, every role a
Serve deployment, the router, the gRPC client, and a clean exit.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from conftest import free_port
from eft_router.server.client import EFTClient

EFT = str(Path(sys.executable).parent / "eft")


def read_until(proc: subprocess.Popen, pattern: str, timeout: float) -> tuple[re.Match, str]:
    """Read the process's output until a line matches ``pattern`` (fails on exit or timeout)."""
    seen = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            continue
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if m := re.search(pattern, line):
            return m, "".join(seen)
    raise AssertionError(f"no line matching {pattern!r}; output so far:\n{''.join(seen)[-3000:]}")


def test_serve_in_process_then_sigterm_stops_gracefully(family_paths, tmp_path):
    config = tmp_path / "ensemble.yaml"
    roles = {r: {"model": family_paths[r]} for r in ("base_large", "base_small", "ft_small")}
    config.write_text(yaml.safe_dump({"roles": roles, "router": {"port": 0, "grace_s": 1.0}}))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [EFT, "serve", "--in-process", "--config", str(config), "--http-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        m, _ = read_until(proc, r"listening on [\d.]+:(\d+) \(gRPC\), OpenAI-compatible HTTP on [\d.]+:(\d+)", 120)
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{m.group(2)}/v1/models", timeout=30).read())
        assert {"eft", "eft-upscale", "ft_small"} <= {model["id"] for model in models["data"]}
        with EFTClient(f"localhost:{m.group(1)}", timeout=60) as client:
            assert client.health() == "SERVING"
            assert len(client.generate("w1 w2", temperature=0.0, max_tokens=4).token_ids) >= 1
            stream = client.stream("w1", max_tokens=400, ignore_eos=True)
            next(stream)  # a generation is in flight when the signal arrives
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert time.monotonic() - started < 15  # the 1 s grace, then in-flight work is cancelled
            stream.close()
        out = proc.stdout.read()
        assert "stopping" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_entry_point_on_tiny_models():
    proc = subprocess.run(
        [EFT, "demo", "--tiny", "--max-tokens", "12"], capture_output=True, text=True, timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "backend serve" in out and "health SERVING" in out
    assert "outputs identical: yes" in out and "streamed text equals the unary answer: yes" in out
    assert "equals the gRPC answer: yes" in out  # the openai client over the HTTP port
    assert re.search(r"speed-up \d+\.\d+x", out) and out.rstrip().endswith("done.")
