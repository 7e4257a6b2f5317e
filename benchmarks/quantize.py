"""Weight-only int8/int4 on SmolLM2-135M-Instruct: decode speed against our fp16 and llama.cpp, perplexity side by side.

Contenders (greedy decode, batch 1, one process): llm_book in float16, int8 and int4 (`load_gguf(dtype=...)`, chapter 43),
each with its decode step compiled (`compile_decode`, chapter 46) and eager (the same model, the graphs switched off),
and llama.cpp (llama-cpp-python) on the same Q4_1 GGUF file. They take turns round by round; each ratio is the median over rounds of
that round's ratio (both sides measured back to back, under the same load), which keeps it fair on a shared, noisy machine. Then the perplexity of a held-out slice of tiny-shakespeare
(chapter 44: same tokens, same windows) for float32, int8, int4 and llama.cpp. Then speculative greedy decoding
(chapter 45): the compiled int4 model drafts up to `--num-draft` tokens per round for the float32 model, checking
prompt-lookup's copies as it goes (`spec_speedup`; the int4 draft alone is printed beside it), against plain float32
greedy compiled the same way and eager, on the prompts of `benchmarks/speculative.py`; the tokens must be
identical. `--no-compile` runs everything eager. The float32 model (perplexity and
speculative) stores its weights column-major (`column_major_weights`, chapter 46) unless `--layout row`. Prints a table, the measured memory
bandwidth and the bound it sets (tok/s <= bandwidth / weight bytes read per token), and ends with one line:

    int4_vs_llamacpp=... int8_vs_fp16=... ppl_fp32=... ppl_int8=... ppl_int4=... ppl_llamacpp=... spec_speedup=... spec_identical=...

    python benchmarks/quantize.py [--new-tokens 64] [--rounds 3] [--threads 1] [--ppl-tokens 512] [--context 256] [--num-draft 16]
                                  [--layout column|row] [--no-compile]

Targets (issue 16): int4 >= 0.8x llama.cpp tok/s, int8 >= 1.5x our fp16 (both compiled: like with like); perplexity int8 within 1% of fp32, int4 within
5% and no worse than llama.cpp's by more than 2%; speculative >= 1.5x plain float32 greedy, tokens identical.
"""
import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from llm_book.batching import column_major_weights, compile_decode
from llm_book.chat import stop_token_ids
from llm_book.evaluate import LlamaCppLogits, perplexity
from llm_book.gguf import load_gguf, smollm2_path
from llm_book.quantize import weight_bytes
from llm_book.speculative import ModelDraft, PromptLookupDraft, speculative_generate
from speculative import SPEC_PROMPTS   # benchmarks/speculative.py: the same prompts

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a short story about a robot who learns to paint."


def decode_ours(model, input_ids, new_tokens, compiled=False):
    "Decode tokens/s after the first token (the first one pays for the prompt), with the compiled decode step or eager."
    compile_decode(model, enable=compiled)   # a compiled model keeps its graphs: switching back and forth is free
    first, count = None, 0
    for _ in model.stream(input_ids, max_new_tokens=new_tokens):
        count += 1
        if first is None: first = time.perf_counter()
    return (count - 1) / (time.perf_counter() - first)


def decode_llamacpp(llm, prompt_ids, new_tokens):
    "The same measure for llama.cpp: greedy (top_k=1), tokens after the first."
    llm.reset()
    first, count = None, 0
    for _ in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
        count += 1
        if first is None: first = time.perf_counter()
        if count == new_tokens: break
    return (count - 1) / (time.perf_counter() - first)


def bandwidth_gbs(megabytes=256, rounds=5):
    "Memory read bandwidth (GB/s): the best of a few sums over a buffer far larger than the caches."
    buffer = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter(); buffer.sum(); best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians over rounds are reported)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and llama.cpp")
    parser.add_argument("--ppl-tokens", type=int, default=512, help="held-out tokens scored for perplexity")
    parser.add_argument("--context", type=int, default=256, help="perplexity window (stride: half of it)")
    parser.add_argument("--num-draft", type=int, default=16, help="tokens the int4 draft guesses per round")
    parser.add_argument("--layout", choices=["column", "row"], default="column",
                        help="the float32 model's weight order (chapter 46's column_major_weights, or nn.Linear's own)")
    parser.add_argument("--no-compile", action="store_true", help="everything eager (no compile_decode)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    has_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 model {args.layout}-major, "
          f"decode steps {'eager only' if args.no_compile else 'compiled and eager'}")

    models, tokenizer = {}, None
    for name, dtype in [("fp32", torch.float32), ("fp16", torch.float16), ("int8", "int8"), ("int4", "int4")]:
        models[name], tokenizer = load_gguf(dtype=dtype)
    column_major_weights(models["fp32"], enable=args.layout == "column")
    if not args.no_compile:
        for name, model in models.items():
            start = time.perf_counter()
            compile_decode(model).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)   # compiles the graphs
            print(f"compile_decode({name}): first decode steps (compiling) {time.perf_counter() - start:.1f} s")
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    input_ids = torch.tensor([prompt_ids])
    llm = None
    if has_llamacpp:
        import llama_cpp
        llm = llama_cpp.Llama(model_path=str(smollm2_path()), n_ctx=512, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
    else:
        print("llama-cpp-python: not installed, llama.cpp column skipped (pip install llama-cpp-python)")

    # contender -> (model, compiled?); "fp16" etc. are the compiled decode steps unless --no-compile
    ours = {name: (name, not args.no_compile) for name in ("fp16", "int8", "int4")}
    if not args.no_compile: ours.update({f"{name} eager": (name, False) for name in ("fp16", "int8", "int4")})
    names = list(ours) + (["llama.cpp"] if llm else [])
    rounds = {name: [] for name in names}   # tok/s per round; the contenders take turns within each round
    with torch.no_grad():
        for _ in range(args.rounds):
            for name in names:
                rounds[name].append(decode_llamacpp(llm, prompt_ids, args.new_tokens) if name == "llama.cpp"
                                    else decode_ours(models[ours[name][0]], input_ids, args.new_tokens, ours[name][1]))
    speed = {name: statistics.median(r) for name, r in rounds.items()}
    # a ratio per round (both sides measured back to back, under the same load), then the median over rounds
    round_ratio = lambda a, b: statistics.median(x / y for x, y in zip(rounds[a], rounds[b]))
    gbs = bandwidth_gbs()
    print(f"memory bandwidth: {gbs:.1f} GB/s (sum over 256 MB, best of 5)")
    print(f"{'model':>10} {'median tok/s':>13} {'best tok/s':>11} {'bytes/weight':>13} {'bound tok/s':>12}")
    for name, rate in speed.items():
        if name == "llama.cpp": print(f"{name:>10} {rate:13.1f} {max(rounds[name]):11.1f} {'':>13} {'':>12}"); continue
        wb = weight_bytes(models[ours[name][0]])
        print(f"{name:>10} {rate:13.1f} {max(rounds[name]):11.1f} {wb['bytes_per_weight']:13.3f} {gbs * 1e9 / wb['bytes']:12.1f}")
    print("ratios, median over rounds of each round's ratio: "
          + ", ".join(f"{a}/{b} {round_ratio(a, b):.3f}" for a, b in [("int8", "fp16"), ("int4", "fp16")]
                      + ([("int4", "llama.cpp"), ("int8", "llama.cpp")] if llm else [])
                      + ([] if args.no_compile else [(f"{n}", f"{n} eager") for n in ("fp16", "int8", "int4")]
                         + [("int8 eager", "fp16 eager")] + ([("int4 eager", "llama.cpp")] if llm else []))))

    text = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[-20_000:]
    held_out = tokenizer.encode(text)[-args.ppl_tokens:]
    window = dict(context_length=args.context, stride=args.context // 2,
                  num_bytes=len(tokenizer.decode(held_out).encode("utf-8")))
    ppl = {name: perplexity(models[name], held_out, **window) for name in ("fp32", "int8", "int4")}
    if has_llamacpp:
        ppl["llamacpp"] = perplexity(LlamaCppLogits(smollm2_path(), args.context, threads=args.threads), held_out, **window)
    print(f"perplexity on {len(held_out)} held-out tokens (window {args.context}, stride {args.context // 2}):")
    for name, r in ppl.items():
        print(f"{name:>10} ppl {r['perplexity']:8.3f}  bits/byte {r['bits_per_byte']:.4f}  "
              f"vs fp32 {r['perplexity'] / ppl['fp32']['perplexity'] - 1:+.2%}")

    # speculative greedy decoding: the int4 model drafts for the float32 model; per round, both on every prompt
    stops = sorted(stop_token_ids(tokenizer))
    prompts = [torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)]) for text in SPEC_PROMPTS]
    fp32 = models["fp32"]
    if not args.no_compile: compile_decode(models["int4"])                     # the draft's decode steps compiled
    drafts = {"speculative": ModelDraft(models["int4"], lookup=PromptLookupDraft()),   # int4 checking lookup's copies
              "int4 draft alone": ModelDraft(models["int4"])}                # (both start from fp32's prompt cache)
    plains = {"plain": not args.no_compile} | ({} if args.no_compile else {"plain eager": False})
    seconds, identical = {name: [] for name in [*plains, *drafts]}, True
    with torch.no_grad():
        for _ in range(args.rounds):
            spent = {name: 0.0 for name in seconds}
            for ids in prompts:
                for name, compiled in plains.items():   # plain float32 greedy, compiled like the draft (and eager)
                    if not args.no_compile: compile_decode(fp32, enable=compiled)
                    start = time.perf_counter()
                    plain = fp32.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=stops)
                    spent[name] += time.perf_counter() - start
                for name, draft in drafts.items():
                    start = time.perf_counter()
                    fast = speculative_generate(fp32, ids, args.new_tokens, draft, args.num_draft, eos_token_id=stops)
                    spent[name] += time.perf_counter() - start
                    identical &= torch.equal(plain, fast)
            for name in spent: seconds[name].append(spent[name])
    speedup = {(plain, name): statistics.median(p / s for p, s in zip(seconds[plain], seconds[name]))
               for plain in plains for name in drafts}
    spec_speedup = speedup["plain", "speculative"]
    for name in drafts:
        print(f"{name}: {'compiled ' if not args.no_compile else ''}int4 draft"
              f"{' checking prompt-lookup copies' if name == 'speculative' else ''}, up to {args.num_draft} guesses per round, "
              f"{len(prompts)} prompts (median over rounds): {speedup['plain', name]:.2f}x plain float32 greedy"
              + ("" if args.no_compile else f" compiled, {speedup['plain eager', name]:.2f}x plain float32 greedy eager"))
    print(f"speculative tokens identical to plain greedy: {identical}")

    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
    figures = dict(int4_vs_llamacpp=round_ratio("int4", "llama.cpp") if llm else None,
                   int8_vs_fp16=round_ratio("int8", "fp16"),
                   ppl_fp32=ppl["fp32"]["perplexity"], ppl_int8=ppl["int8"]["perplexity"],
                   ppl_int4=ppl["int4"]["perplexity"], ppl_llamacpp=ppl["llamacpp"]["perplexity"] if has_llamacpp else None)
    print(" ".join(f"{k}={fmt(v)}" for k, v in figures.items()) + f" spec_speedup={spec_speedup:.3f} spec_identical={identical}")


if __name__ == "__main__":
    main()
