"""Greedy generation speed of SmolLM2-135M-Instruct: llm_book (fp32, fp16, bf16) vs Transformers (fp32) and llama.cpp.

Contenders: the model's own `stream` (the one decode path: `llm_book.core.generation`, which `model.generate` and
`llm_book chat` use) in fp32/fp16/bf16, Transformers' `generate` in fp32 on the same GGUF file, and llama.cpp
(llama-cpp-python, `pip install -e .[bench]`) on the same Q4_1 file when it is installed.

One run, ratios against Transformers measured in the same process. Each contender generates `--new-tokens` tokens
(greedy, batch 1) for each prompt; contenders take turns round by round and the best round counts, which keeps
the comparison fair on a shared, noisy machine. Prints prompt-processing and decode tokens/s separately, how many
greedy tokens of the half-precision models match fp32, the weights' memory and the process's peak memory.

    python benchmarks/generate_smollm2.py [--new-tokens 128] [--rounds 3] [--threads N]

On a machine shared with other jobs, `--threads 1` gives steadier ratios: with two threads per process on two busy
cores, every small operator waits at a thread barrier, which buries the per-token cost this benchmark compares.
"""
import argparse
import importlib.util
import os
import resource
import time

os.environ.setdefault("TQDM_DISABLE", "1")   # Transformers' GGUF loader draws a progress bar

import torch

from llm_book.gguf import load_gguf, smollm2_path

PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain how a rainbow forms, step by step.",
           "What are three good habits for writing clean Python code?"]


class Timer:
    "A Transformers streamer that records when each batch of tokens arrives (the prompt first, then one per step)."
    def __init__(self): self.times = []
    def put(self, value): self.times.append(time.perf_counter())
    def end(self): pass


def run_ours(model, input_ids, new_tokens):
    "(tokens, prefill seconds, decode seconds) for our model: the first token costs the prompt's forward pass."
    start = time.perf_counter()
    tokens, first = [], None
    for token in model.stream(input_ids, max_new_tokens=new_tokens):
        tokens.append(int(token[0]))
        if first is None: first = time.perf_counter()
    end = time.perf_counter()
    return tokens, first - start, end - first


def run_hf(hf_model, input_ids, new_tokens):
    "(tokens, prefill seconds, decode seconds) for Transformers' generate."
    timer = Timer()
    start = time.perf_counter()
    out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, streamer=timer, pad_token_id=2)
    end = time.perf_counter()
    return out[0, input_ids.shape[1]:].tolist(), timer.times[1] - start, end - timer.times[1]


def run_llama_cpp(llm, input_ids, new_tokens):
    "(tokens, prefill seconds, decode seconds) for llama.cpp's greedy sampling (top_k=1) on the same prompt ids."
    start = time.perf_counter()
    tokens, first = [], None
    for token in llm.generate(input_ids[0].tolist(), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if first is None: first = time.perf_counter()
        if len(tokens) == new_tokens: break
    end = time.perf_counter()
    return tokens, first - start, end - first


def matching_prefix(a, b):
    "How many leading tokens two generations share."
    n = 0
    for x, y in zip(a, b):
        if x != y: break
        n += 1
    return n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    path = smollm2_path()
    contenders = {}
    model32, tokenizer = load_gguf(path, dtype=torch.float32)
    model16 = load_gguf(path, dtype=torch.float16)[0]
    model_bf16 = load_gguf(path, dtype=torch.bfloat16)[0]
    contenders["stream fp32"] = (run_ours, model32)
    contenders["stream fp16"] = (run_ours, model16)
    contenders["stream bf16"] = (run_ours, model_bf16)
    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    contenders["transformers fp32"] = (run_hf, hf_model)
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python: not installed, column skipped (pip install -e .[bench] to compare)")
    else:
        from llama_cpp import Llama as LlamaCpp
        llm = LlamaCpp(model_path=str(path), n_ctx=2048, n_threads=torch.get_num_threads(),
                       n_threads_batch=torch.get_num_threads(), verbose=False)
        contenders["llama.cpp Q4_1"] = (run_llama_cpp, llm)

    prompts = [torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": p}])]) for p in PROMPTS]
    print(f"SmolLM2-135M-Instruct Q4_1, greedy, batch 1, {args.new_tokens} new tokens, {len(prompts)} prompts "
          f"({', '.join(str(p.shape[1]) for p in prompts)} prompt tokens), best of {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    best = {name: [None] * len(prompts) for name in contenders}   # (total, prefill, decode, tokens)
    with torch.inference_mode():
        for _ in range(args.rounds):
            for i, input_ids in enumerate(prompts):
                for name, (run, model) in contenders.items():
                    tokens, prefill, decode = run(model, input_ids, args.new_tokens)
                    if best[name][i] is None or prefill + decode < best[name][i][0]:
                        best[name][i] = (prefill + decode, prefill, decode, tokens)

    prompt_tokens = sum(p.shape[1] for p in prompts)
    total_new = args.new_tokens * len(prompts)
    reference = sum(b[0] for b in best["transformers fp32"])
    print(f"\n{'contender':<20}{'total tok/s':>12}{'prefill tok/s':>15}{'decode tok/s':>14}{'vs HF fp32':>12}"
          f"{'weights MB':>12}{'greedy = fp32 (first 64)':>27}")
    for name, (_, model) in contenders.items():
        total = sum(b[0] for b in best[name])
        prefill = sum(b[1] for b in best[name])
        decode = sum(b[2] for b in best[name])
        weights_mb = (sum(p.numel() * p.element_size() for p in model.parameters()) if hasattr(model, "parameters")
                      else path.stat().st_size) / 1e6
        matches = [matching_prefix(b[3][:64], r[3][:64]) for b, r in zip(best[name], best["stream fp32"])]
        print(f"{name:<20}{total_new / total:>12.1f}{prompt_tokens / prefill:>15.1f}"
              f"{(total_new - len(prompts)) / decode:>14.1f}{reference / total:>11.2f}x{weights_mb:>12.0f}"
              f"{'/'.join(map(str, matches)):>27}")
    same = [matching_prefix(b[3], r[3]) for b, r in zip(best["transformers fp32"], best["stream fp32"])]
    print(f"stream fp32 vs Transformers fp32: {'/'.join(map(str, same))} of {args.new_tokens} greedy tokens identical")
    speed = {name: total_new / sum(b[0] for b in best[name]) for name in contenders}
    fp16_same = all(matching_prefix(b[3][:64], r[3][:64]) == 64 for b, r in zip(best["stream fp16"], best["stream fp32"]))
    verdict = lambda ok: "met" if ok else "NOT met"
    fp32_ratio, fp16_ratio = speed["stream fp32"] / speed["transformers fp32"], speed["stream fp16"] / speed["transformers fp32"]
    print(f"target model.generate fp32 >= 1.3x Transformers fp32: {fp32_ratio:.2f}x ({verdict(fp32_ratio >= 1.3)})")
    print(f"target fp16 >= 3.0x Transformers fp32 with its first 64 greedy tokens = fp32's: {fp16_ratio:.2f}x, "
          f"tokens equal: {fp16_same} ({verdict(fp16_ratio >= 3.0 and fp16_same)})")
    if "llama.cpp Q4_1" in speed:
        ours = max((n for n in contenders if n.startswith("stream")), key=speed.get)
        print(f"our best path ({ours}) vs llama.cpp Q4_1: {speed[ours] / speed['llama.cpp Q4_1']:.2f}x")
    print(f"peak memory of this process (llm_book fp32, fp16, bf16 models, Transformers fp32 and llama.cpp loaded): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")


if __name__ == "__main__":
    main()
