"""The server of chapter 49 end to end: the official `openai` client (streamed and not), OpenAI-shaped errors, a full
server's 503, a disconnect freeing its blocks, `llm_book serve` with the real SmolLM2, and the chat page in headless
Chromium."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx: pip install -e '.[dev,serve]'")
openai = pytest.importorskip("openai", reason="the serve tests need the openai client: pip install -e '.[dev,serve]'")

from cdp import chromium_page, free_port
from llm_book.gguf import smollm2_path
from llm_book.models.configs import get_config
from llm_book.models.llama import Llama
from llm_book.serve.server import ServerThread, create_app
from llm_book.tokenizers.bpe_tokenizer import BPETokenizer

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.from_gguf(smollm2_path())


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    "A random 2-layer LLaMA with SmolLM2's vocabulary (and chat template, through the tokenizer)."
    torch.manual_seed(0)
    return Llama(get_config("llama-tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=512)).eval()


@pytest.fixture(scope="module")
def server(tiny_model, tokenizer):
    with ServerThread(create_app(tiny_model, tokenizer, "tiny", num_blocks=64, block_size=16, max_batch_size=8)) as url:
        yield url


def blocks_used(url) -> int:
    return httpx.get(url + "/health").json()["blocks_used"]


def test_openai_client_chat_streamed_and_not(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 16 and reply.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert len([c for c in chunks if c.choices[0].delta.content]) > 3          # it streamed, piece by piece
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert blocks_used(server) == 0


def test_completions_streamed_equals_whole(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    pieces = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert whole.usage.completion_tokens == 10


def test_concurrent_clients_each_get_their_greedy_reply(server):
    "Replies of different lengths in one batch: each equals what it gives alone."
    from concurrent.futures import ThreadPoolExecutor
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    ask = lambda n: client.completions.create(model="tiny", prompt=f"count {n}", max_tokens=5 + 3 * n, temperature=0)
    alone = [ask(n).choices[0].text for n in range(6)]
    with ThreadPoolExecutor(6) as pool:
        together = [r.choices[0].text for r in pool.map(ask, range(6))]
    assert together == alone


@pytest.mark.parametrize("body, status, message", [
    (b'{"messages": [', 400, "not valid JSON"),
    ({"model": "gpt-4o", "messages": HELLO}, 404, "does not exist"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
    ({"messages": HELLO, "temperature": -1}, 400, "'temperature' must be in [0, 2]"),
    ({"messages": [{"role": "user", "content": "hello " * 600}]}, 400, "maximum context length is 512"),
], ids=["malformed-json", "unknown-model", "max-tokens-0", "negative-temperature", "prompt-too-long"])
def test_bad_requests_get_openai_errors(server, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body)
    response = httpx.post(server + "/v1/chat/completions", content=content)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    if not isinstance(body, bytes):                      # the official client raises the matching error class
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(**{"model": "tiny", **body})
        assert raised.value.status_code == status


def test_disconnect_mid_stream_frees_blocks(server):
    with httpx.stream("POST", server + "/v1/chat/completions",
                      json={"messages": HELLO, "max_tokens": 400, "temperature": 0, "stream": True}) as response:
        lines = response.iter_lines()
        next(lines), next(lines)
        assert blocks_used(server) > 0
    steps = httpx.get(server + "/health").json()["steps"]
    deadline = time.time() + 10
    while blocks_used(server) and time.time() < deadline:
        time.sleep(0.005)
    health = httpx.get(server + "/health").json()
    assert health["blocks_used"] == 0 and health["running"] == 0
    assert health["steps"] - steps <= 400               # freed long before the 400 tokens were done


def test_full_server_answers_503_with_retry_after(tiny_model, tokenizer):
    app = create_app(tiny_model, tokenizer, "tiny", num_blocks=520, max_batch_size=1, max_waiting=0, max_context=8192)
    with ServerThread(app) as url:
        with httpx.stream("POST", url + "/v1/completions",
                          json={"prompt": "a", "max_tokens": 8000, "temperature": 0, "stream": True}) as first:
            lines = first.iter_lines()
            next(lines)
            refused = httpx.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 5})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
        deadline = time.time() + 10
        while blocks_used(url) and time.time() < deadline:
            time.sleep(0.01)
        ok = httpx.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 5, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5   # nothing broke


def test_llm_book_serve_smollm2_with_the_openai_client():
    "`llm_book serve` with no model argument serves SmolLM2; its greedy streamed reply is `llm_book.chat`'s."
    from llm_book.chat import chat
    from llm_book.gguf import load_gguf
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "llm_book.cli", "serve", "--port", str(port), "--max-batch-size", "4"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
        while True:
            try:
                if httpx.get(url + "/health").json()["status"] == "ok": break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, f"llm_book serve exited: {proc.stdout.read()}"
            assert time.time() < deadline, "llm_book serve did not come up within 180 s"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        question = [{"role": "user", "content": "What is the capital of France?"}]
        name = client.models.list().data[0].id
        assert name == "SmolLM2-135M-Instruct"
        stream = client.chat.completions.create(model=name, messages=question, max_tokens=12, temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    model, tokenizer = load_gguf()
    assert streamed == "".join(chat(model, tokenizer, question, max_new_tokens=12))
    assert "Paris" in streamed


def test_chat_page_streams_and_stops_in_chromium(tiny_model, tokenizer):
    "Type a message, see streamed text appear, press Stop: the reply stays in the conversation, the blocks return."
    app = create_app(tiny_model, tokenizer, "tiny", num_blocks=520, max_batch_size=2, max_context=8192)
    with ServerThread(app) as url, chromium_page() as tools:
        for domain in ("Page", "Runtime"):
            tools.send(f"{domain}.enable")
        tools.send("Page.navigate", url=url + "/")
        tools.wait_event("Page.loadEventFired", timeout=30)
        assert tools.evaluate("document.title") == "llm_book chat"
        tools.evaluate("document.getElementById('input').value = 'Tell me a long story.';"
                       "document.getElementById('send').click(); 0")
        deadline, text = time.time() + 30, ""
        while len(text) < 20 and time.time() < deadline:         # pieces arrive while it is still generating
            text = tools.evaluate("(document.querySelector('.msg.assistant') || {}).textContent || ''")
            time.sleep(0.02)
        assert len(text) >= 20, "no streamed text appeared"
        assert tools.evaluate("document.getElementById('status').textContent") == "generating…"
        assert tools.evaluate("document.getElementById('stop').disabled") is False
        tools.evaluate("document.getElementById('stop').click(); 0")
        deadline = time.time() + 10
        while tools.evaluate("document.getElementById('status').textContent") != "stopped" and time.time() < deadline:
            time.sleep(0.02)
        assert tools.evaluate("document.getElementById('status').textContent") == "stopped"
        kept = tools.evaluate("messages.map(m => [m.role, m.content.length])")
        assert [role for role, _ in kept] == ["user", "assistant"] and kept[1][1] >= len(text)
        deadline = time.time() + 10
        while blocks_used(url) and time.time() < deadline:
            time.sleep(0.02)
        assert blocks_used(url) == 0                           # the aborted fetch cancelled the request
        assert tools.evaluate("document.getElementById('send').disabled") is False
