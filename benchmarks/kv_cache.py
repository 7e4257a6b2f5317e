"""KV-cache benchmark: greedy generation with and without the cache on a GPT-2-small-shaped model (CPU).

GPT-2 small shape (124M parameters, random weights), batch 1, a 32-token prompt, 256 new tokens. Prints the
total time of each, the speed-up (target >= 7x), our cached decode against Transformers' `generate` on the same
weights (`llm_book.hf.to_hf`, sdpa attention, greedy; target >= 1.2x), and the time per token at sequence lengths
64, 128 and 256: flat with the cache (each step does the same work plus a slightly longer attention), growing
without it. Absolute times depend on the machine (and its load); the ratios are measured in the same run, with
the contenders taking turns (`--rounds`, best round counts).
"""
import argparse
import statistics
import time

import torch

from llm_book.models.gpt import GPT2


def per_token_times(model, prompt, num_new, use_cache):
    "Seconds for each generated token (the first one includes the prompt's forward pass)."
    times, start = [], time.perf_counter()
    for _ in model.stream(prompt, max_new_tokens=num_new, use_cache=use_cache):
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def hf_seconds(hf_model, prompt, num_new):
    "Seconds for Transformers' greedy `generate` with its own KV cache (exactly `num_new` tokens)."
    start = time.perf_counter()
    hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=num_new, min_new_tokens=num_new,
                      do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def time_at(times, prompt_length, sequence_length, spread=8):
    "Median seconds per token for steps whose sequence length is within `spread` of `sequence_length`."
    steps = [t for i, t in enumerate(times) if abs(prompt_length + i + 1 - sequence_length) <= spread and i > 0]
    return statistics.median(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--rounds", type=int, default=2, help="turns of the cached contenders; the best counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2.from_preset("gpt2").eval()
    prompt = torch.randint(0, model.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    model.generate(prompt, max_new_tokens=4)                                         # warm-up
    model.generate(prompt, max_new_tokens=2, use_cache=False)

    import transformers
    from llm_book.hf import to_hf
    transformers.utils.logging.set_verbosity_error()
    hf_model = to_hf(model).eval()
    hf_model.config._attn_implementation = "sdpa"
    hf_seconds(hf_model, prompt, 4)                                                     # warm-up
    cached, hf_best = None, None
    for _ in range(args.rounds):   # take turns, so load spikes on a shared machine hit both
        times = per_token_times(model, prompt, args.new_tokens, use_cache=True)
        if cached is None or sum(times) < sum(cached): cached = times
        with torch.inference_mode(): seconds = hf_seconds(hf_model, prompt, args.new_tokens)
        hf_best = seconds if hf_best is None else min(hf_best, seconds)
    uncached = per_token_times(model, prompt, args.new_tokens, use_cache=False)
    same = torch.equal(model.generate(prompt, max_new_tokens=16), model.generate(prompt, max_new_tokens=16, use_cache=False))

    print(f"GPT-2 small shape, random weights, batch 1, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"{args.threads} CPU thread(s), torch {torch.__version__}")
    print(f"with cache:    {sum(cached):7.2f} s  ({args.new_tokens / sum(cached):6.1f} tokens/s)")
    print(f"without cache: {sum(uncached):7.2f} s  ({args.new_tokens / sum(uncached):6.1f} tokens/s)")
    print(f"Transformers generate (sdpa, its own cache), same weights: {hf_best:7.2f} s  ({args.new_tokens / hf_best:6.1f} tokens/s)")
    speed_up, vs_hf = sum(uncached) / sum(cached), hf_best / sum(cached)
    print(f"cache speed-up: {speed_up:.2f}x (target >= 7x: {'met' if speed_up >= 7 else 'NOT met'}); "
          f"greedy tokens identical: {same}")
    print(f"cached decode vs Transformers generate: {vs_hf:.2f}x (target >= 1.2x: {'met' if vs_hf >= 1.2 else 'NOT met'})")
    print("ms per token at sequence length:   " + "".join(f"{n:>8d}" for n in (64, 128, 256)))
    lengths = [n for n in (64, 128, 256) if n <= args.prompt_tokens + args.new_tokens]
    for name, times in (("with cache", cached), ("without cache", uncached)):
        per_token = [time_at(times, args.prompt_tokens, n) * 1000 for n in lengths]
        print(f"  {name:32s}" + "".join(f"{ms:8.1f}" for ms in per_token)
              + f"   (256 / 64: {per_token[-1] / per_token[0]:.2f}x)")


if __name__ == "__main__":
    main()
