"""Fixtures and helpers of the HTTP tests. A real server: a small random Llama (MiniLM's tokenizer, a chat
template) saved to a tmp folder, three deltas saved beside it, served by uvicorn on a free loopback port in a
background thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import randomize_delta
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.methods import make_config

API_KEY = "test-key-123456"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@dataclass
class Served:
    url: str
    root: Path
    app: object
    server: object
    deltas: dict[str, Path]


@pytest.fixture(scope="session")
def served_root(tmp_path_factory, minilm_path) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("serve")
    small_llama().save_pretrained(root / "base")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(root / "base")
    deltas = {}
    for i, (name, method, cfg) in enumerate([("a", "lora", {"r": 4}), ("b", "dora", {"r": 2}),
                                             ("c", "adapter", {"bottleneck": 8})]):
        delta = randomize_delta(small_llama(), make_config(method, cfg), seed=i + 1, std=0.5)
        delta.provenance.base = str(root / "base")
        deltas[name] = delta.save(root / name)
    return root, deltas


def start_server(app, port: int = 0):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(served_root):
    from deltatune.serve.app import ServerLimits
    from deltatune.serve.engine import EngineConfig
    from deltatune.serve.launch import ServeConfig, build_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root, deltas = served_root
    cfg = ServeConfig(model=str(root / "base"), deltas={k: str(v) for k, v in deltas.items() if k != "c"},
                      served_name="base", engine=EngineConfig(max_batch=8, prefill_chunk=32),
                      limits=ServerLimits(max_body_bytes=64_000, max_prompt_tokens=64, max_tokens=60,
                                          api_key=API_KEY, allow_load=True))
    app = build_app(cfg)
    server, thread, url = start_server(app)
    yield Served(url, root, app, server, deltas)
    server.should_exit = True
    thread.join(timeout=30)
    torch.set_num_threads(threads)


def engine_of(served: Served):
    return served.app.state.serve.engine


def greedy_text(root: Path, delta_path: Path | None, prompt: str, steps: int) -> str:
    tok = AutoTokenizer.from_pretrained(root / "base")
    model = LlamaForCausalLM.from_pretrained(root / "base").eval()
    if delta_path is not None:
        deltatune.apply_delta(model, deltatune.load_delta(delta_path))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return tok.decode(ids[0, start:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
