"""`llm_book serve` under load: 1, 4, 16 and 64 concurrent streaming clients, each for a fixed time.

Starts `llm_book serve` (SmolLM2-135M-Instruct from its GGUF unless --model names another file) as a subprocess on a
free port of 127.0.0.1, then for each concurrency level runs that many clients, each streaming chat completions one
after another until the level's time is up (requests in flight then finish). Prints, per level: generated tokens/s
(counted by the server), time to first token p50/p99, requests completed/failed, and the pool's high-water mark; then
the ratio of 16 streams' tokens/s to one stream's (target >= 4x) and whether any request was lost at 64 clients.

    python benchmarks/serve.py [--seconds 20] [--levels 1 4 16 64] [--max-tokens 48] [--threads 2]
"""
import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llm_book.training.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "Why is the sky blue?",
             "Write a haiku about the sea.", "What is 12 times 7?", "Give me a tip for learning Python.",
             "What does a compiler do?", "Describe a cat in one sentence."]



async def one_request(client, url, index, max_tokens) -> tuple[bool, float | None]:
    "Stream one chat completion; (ok, seconds to the first piece)."
    body = {"messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": index, "stream": True}
    start, first, done = time.perf_counter(), None, False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return False, None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if first is None and delta.get("content"):
                    first = time.perf_counter() - start
    except httpx.HTTPError:
        return False, None
    return done, first


async def level(url, clients, seconds, max_tokens) -> dict:
    "Run `clients` streaming clients for `seconds`; the server's token counter gives tokens/s."
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        before = (await client.get(url + "/health")).json()["tokens_generated"]
        results, counter, start = [], [0], time.perf_counter()

        async def worker():
            while time.perf_counter() - start < seconds:
                counter[0] += 1
                results.append(await one_request(client, url, counter[0], max_tokens))

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
        health = (await client.get(url + "/health")).json()
    ttft = sorted(t for ok, t in results if ok and t is not None)
    pick = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
    return {"clients": clients, "tokens_per_s": (health["tokens_generated"] - before) / elapsed,
            "ttft_p50": pick(0.50), "ttft_p99": pick(0.99), "completed": sum(ok for ok, _ in results),
            "failed": sum(not ok for ok, _ in results), "max_blocks": health["max_blocks_used"],
            "blocks_total": health["blocks_total"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time each level's clients keep starting requests")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = parser.parse_args(argv)
    port, url = free_port(), None
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "llm_book.cli", "serve", "--port", str(port), "--max-batch-size", str(max(args.levels))]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                print("llm_book serve did not come up", file=sys.stderr)
                return 1
            time.sleep(0.5)
        asyncio.run(level(url, 2, 3.0, args.max_tokens))          # warm-up, not reported
        rows = [asyncio.run(level(url, n, args.seconds, args.max_tokens)) for n in args.levels]
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"\nllm_book serve, {args.seconds:.0f} s per level, max_tokens={args.max_tokens}, temperature 0.7, "
          f"{args.threads} server threads")
    print("| clients | tokens/s | TTFT p50 (s) | TTFT p99 (s) | completed | failed | max blocks used / pool |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | "
              f"{r['completed']} | {r['failed']} | {r['max_blocks']} / {r['blocks_total']} |")
    by_clients = {r["clients"]: r for r in rows}
    if 1 in by_clients and 16 in by_clients:
        ratio = by_clients[16]["tokens_per_s"] / by_clients[1]["tokens_per_s"]
        print(f"16 streams vs 1: {ratio:.2f}x tokens/s (target >= 4x)")
    if 64 in by_clients:
        print(f"64 clients: {by_clients[64]['failed']} requests lost (target 0)")
    print("key=value " + " ".join(f"tps_{r['clients']}={r['tokens_per_s']:.1f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
