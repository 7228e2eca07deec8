"""``deltatune serve`` as a command (a real process on a loopback port), and a bounded load test: 1,000 concurrent
mixed requests across 8 deltas finish with no error, twice, and the server's memory stays flat (slow tier; a
fast variant with 96 requests runs by default)."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters of the tests)

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import torch
from conftest import randomize_delta
from serve_helpers import API_KEY, served_root, small_llama, start_server  # noqa: F401 (fixtures)

from deltatune.methods import make_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_serve_command_serves_until_terminated(served_root):
    """A real ``deltatune serve`` process (slow: the CLI's imports take ~10-30 s on a busy 2-core machine)."""
    root, deltas = served_root
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTATUNE_API_KEY": API_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", "--model", str(root / "base"),
                             "--delta", f"a={deltas['a']}", "--delta", f"c={deltas['c']}", "--port", str(port),
                             "--served-model-name", "tiny"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        auth = {"authorization": f"Bearer {API_KEY}"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny", "a", "c"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers=auth, timeout=30,
                       json={"model": "c", "prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
        load = httpx.post(f"http://127.0.0.1:{port}/v1/load_lora_adapter", headers=auth, timeout=10,
                          json={"lora_name": "b", "lora_path": str(deltas["b"])})
        assert load.status_code == 403  # run-time loading is off unless --allow-load
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_serve_command_reports_bad_options_in_one_line(tmp_path, monkeypatch, capsys):
    from deltatune.cli import main

    for argv, needle in [(["--model", str(tmp_path / "none")], "is not a local folder"),
                         (["--model", str(tmp_path), "--delta", "=x"], "--delta expects name=PATH"),
                         (["--model", str(tmp_path), "--port", "70000"], "--port must be in")]:
        monkeypatch.setattr(sys, "argv", ["deltatune", "serve", *argv])
        with pytest.raises(SystemExit) as done:
            main()
        err = capsys.readouterr().err.strip()
        assert done.value.code == 2 and needle in err and len(err.splitlines()) == 1, err


@pytest.fixture(scope="module")
def eight(served_root):
    from deltatune.serve.app import ServerLimits
    from deltatune.serve.engine import EngineConfig
    from deltatune.serve.launch import ServeConfig, build_app

    root, _ = served_root
    kinds = [("lora", {"r": 2}), ("lora", {"r": 8}), ("dora", {"r": 2}), ("ia3", {}), ("adapter", {"bottleneck": 4}),
             ("sparse", {"num_tunable": 500, "regrow": False}), ("lora", {"r": 4}), ("lora", {"r": 1})]
    paths = {}
    for i, (method, cfg) in enumerate(kinds):
        path = root / f"load{i}"
        if not path.exists():
            d = randomize_delta(small_llama(), make_config(method, cfg), seed=20 + i, std=0.2)
            d.save(path)
        paths[f"d{i}"] = str(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = build_app(ServeConfig(model=str(root / "base"), deltas=paths, served_name="base",
                                engine=EngineConfig(max_batch=32, prefill_chunk=256),
                                limits=ServerLimits(max_tokens=8, api_key=API_KEY)))
    server, thread, url = start_server(app)
    yield url, list(paths), app
    server.should_exit = True
    thread.join(timeout=60)
    torch.set_num_threads(threads)


async def _flood(url: str, names: list[str], n: int) -> list[str]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers={"authorization": f"Bearer {API_KEY}"}) as http:
        async def one(i: int) -> str:
            name = [*names, "base"][i % (len(names) + 1)]
            body = {"model": name, "prompt": f"request number {i}", "max_tokens": 2 + i % 3, "temperature": 0.7,
                    "seed": i, "stream": i % 2 == 0}
            r = await http.post("/v1/completions", json=body)
            if r.status_code != 200:
                return f"http {r.status_code}: {r.text[:200]}"
            if body["stream"]:
                return "ok" if r.text.rstrip().endswith("data: [DONE]") else f"bad stream {r.text[-200:]}"
            return "ok" if r.json()["choices"][0]["finish_reason"] in ("length", "stop") else r.text[:200]
        return list(await asyncio.gather(*(one(i) for i in range(n))))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_concurrent_mixed_requests_across_eight_deltas(eight):
    url, names, app = eight
    results = asyncio.run(_flood(url, names, 96))
    assert results == ["ok"] * 96
    assert app.state.serve.engine.pending() == 0


@pytest.mark.slow
def test_a_thousand_concurrent_requests_twice_with_flat_memory(eight):
    url, names, app = eight
    rss = []
    for _ in range(3):
        results = asyncio.run(_flood(url, names, 1000))
        assert results == ["ok"] * 1000
        rss.append(_rss_mb())
    assert app.state.serve.engine.pending() == 0
    assert rss[2] - rss[1] < 25, f"RSS grew from {rss[1]:.0f} MB to {rss[2]:.0f} MB over a round"
