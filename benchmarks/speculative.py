"""Speculative decoding, batched generation and the compiled decode step on SmolLM2-135M-Instruct (fp32), in one run.

Three comparisons, each against a baseline measured in the same process, contenders taking turns round by round
(best round counts, which keeps the ratios fair on a shared, noisy machine):

1. Greedy decoding, batch 1: plain `model.generate` (eager, and compiled by `compile_decode` unless `--no-compile`:
   `spec_speedup` divides by the compiled one, since the int4 draft is compiled too) against `speculative_generate`
   with a prompt-lookup draft, an
   int4 copy (`load_gguf(dtype="int4")`, its decode step compiled by `compile_decode` unless `--no-compile`; it starts
   from the float32 model's cache of the prompt, chapter 45) guessing 10 or 16 tokens per round as drafts, and
   the same int4 draft checking prompt lookup's copies (`ModelDraft(int4, lookup=PromptLookupDraft())`), and
   optionally a layer-skipping draft (`truncated_model`, `--draft-layers N`); tokens must be identical. Target: >= 1.5x.
2. `generate_batch` of 8 prompts of different lengths against batch 1 (the same 8 prompts one by one), in new
   tokens per second, `--new-tokens` each (the prefill of the longest prompt weighs more the fewer tokens follow it);
   every row must equal its prompt alone. Target: >= 4x.
3. `compile_decode` of the float32 model against eager, batch 1 and batch 8 (the compile time is printed, not counted).

The float32 model's weights are stored column-major (`column_major_weights`, chapter 46: MKL's products of a few
rows, a verification or a batched step, run faster that way on some CPUs) unless `--layout row`; the header says
which layout ran. Plain and speculative, batch 1 and batch 8 all use the same model, so each ratio compares like
with like.

Ends with one line of `key=value` figures.

    python benchmarks/speculative.py [--new-tokens 64] [--rounds 2] [--threads 1] [--no-compile] [--layout column|row]
"""
import argparse
import copy
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from llm_book.batching import column_major_weights, compile_decode, generate_batch
from llm_book.chat import stop_token_ids
from llm_book.gguf import load_gguf, smollm2_path
from llm_book.speculative import ModelDraft, PromptLookupDraft, SpeculationStats, speculative_generate, truncated_model

CODE = '''def moving_average(values, window):
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            result.append(total / window)
    return result'''
SPEC_PROMPTS = [f"Add type hints to this Python function. Reply with the whole function only.\n\n{CODE}",
                "Repeat the following list exactly, one item per line: apples, bananas, cherries, dates, "
                "elderberries, figs, grapes, honeydew melons, kiwis, lemons.",
                "Explain how a rainbow forms, step by step."]
BATCH_PROMPTS = ["Write a haiku about the sea.", "What is 17 times 23?", "Name three prime numbers.",
                 "Explain how a rainbow forms, step by step.", "Give me a short tip for writing clean Python code.",
                 "Translate 'good morning' into French, Spanish and German.", "Who wrote Hamlet?",
                 "Describe a cat in one sentence, then describe a dog in one sentence."]


def best_of(rounds, contenders):
    "Run each contender once per round, in turns; {name: (best seconds, result)}."
    best = {}
    for _ in range(rounds):
        for name, run in contenders.items():
            start = time.perf_counter(); result = run(); seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]: best[name] = (seconds, result)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--num-draft", type=int, default=6, help="guesses per round (prompt lookup)")
    parser.add_argument("--draft-layers", type=int, default=0, help="also try the first N layers as a draft (0: no)")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile: the int4 draft eager, no comparison 3")
    parser.add_argument("--layout", choices=["column", "row"], default="column",
                        help="the float32 weights' memory order (chapter 46's column_major_weights, or nn.Linear's own)")
    args = parser.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_gguf(smollm2_path(), dtype=torch.float32)
    column_major_weights(model, enable=args.layout == "column")
    stops = sorted(stop_token_ids(tokenizer))
    chat = lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    print(f"SmolLM2-135M-Instruct fp32, greedy, {args.new_tokens} new tokens max, best of {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.layout}-major weights")
    figures = {}

    # 1. speculative greedy, batch 1
    int4 = load_gguf(smollm2_path(), dtype="int4")[0]            # the file's own 4-bit blocks (chapter 43): self-speculation
    if not args.no_compile:                                       # its decode steps compiled (chapter 46): a cheaper draft
        start = time.perf_counter()
        compile_decode(int4).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
        print(f"compile_decode(int4 draft): first decode steps (compiling) {time.perf_counter() - start:.1f} s")
    int4_checking_lookup = ModelDraft(int4, lookup=PromptLookupDraft())   # the draft checks lookup's copies (chapter 45)
    compiled = None if args.no_compile else compile_decode(copy.deepcopy(model))   # plain greedy, compiled like the draft
    spec = {"plain": lambda ids: (model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=stops), None),
            **({} if compiled is None else {"plain compiled": lambda ids: (
                compiled.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=stops), None)}),
            f"lookup k={args.num_draft}": lambda ids: _spec(model, ids, args, PromptLookupDraft(), args.num_draft, stops),
            "int4 copy k=10": lambda ids: _spec(model, ids, args, int4, 10, stops),
            "int4 copy k=16": lambda ids: _spec(model, ids, args, int4, 16, stops),
            "int4 + lookup k=16": lambda ids: _spec(model, ids, args, int4_checking_lookup, 16, stops)}
    if args.draft_layers:   # layer skipping: the model's first layers (shared weights) as the draft
        layer_draft = truncated_model(model, args.draft_layers)
        spec[f"{args.draft_layers}-layer draft k=3"] = lambda ids: _spec(model, ids, args, layer_draft, 3, stops)
    totals = {name: [0.0, 0, SpeculationStats()] for name in spec}
    identical = True
    print(f"\n{'prompt':<8}" + "".join(f"{name:>26}" for name in spec) + "   (tok/s, acceptance)")
    for i, text in enumerate(SPEC_PROMPTS):
        ids = torch.tensor([chat(text)])
        best = best_of(args.rounds, {name: (lambda run=run: run(ids)) for name, run in spec.items()})
        plain_out = best["plain"][1][0]
        row = f"{i:<8}"
        for name, (seconds, (out, stats)) in best.items():
            num_new = out.shape[1] - ids.shape[1]
            identical &= torch.equal(out, plain_out)
            totals[name][0] += seconds; totals[name][1] += num_new
            if stats: totals[name][2].proposed += stats.proposed; totals[name][2].accepted += stats.accepted
            row += f"{num_new / seconds:>18.1f} tok/s" + (f" {stats.acceptance_rate:>4.0%}" if stats else "     ")
        print(row)
    plain_rate = totals["plain"][1] / totals["plain"][0]
    for name, (seconds, tokens, stats) in totals.items():
        print(f"{name:<26} {tokens / seconds:6.1f} tok/s  {tokens / seconds / plain_rate:5.2f}x plain"
              + (f"  acceptance {stats.acceptance_rate:.0%}" if not name.startswith("plain") else ""))
    print(f"speculative tokens identical to plain greedy: {identical}")
    best_spec_rate = max(t[1] / t[0] for n, t in totals.items() if not n.startswith("plain"))
    baseline = "plain" if compiled is None else "plain compiled"        # like with like: the draft is compiled too
    figures["spec_speedup"] = best_spec_rate / (totals[baseline][1] / totals[baseline][0])
    if compiled is not None: figures["spec_vs_plain_eager"] = best_spec_rate / plain_rate
    figures["spec_identical"] = identical

    # 2. batch 8 vs batch 1
    prompts = [chat(text) for text in BATCH_PROMPTS]
    n = args.new_tokens
    best = best_of(args.rounds, {"batch 1": lambda: [generate_batch(model, [p], n)[0] for p in prompts],
                                 "batch 8": lambda: generate_batch(model, prompts, n)})
    rate = {name: len(prompts) * n / seconds for name, (seconds, _) in best.items()}
    rows_identical = best["batch 1"][1] == best["batch 8"][1]
    print(f"\n8 prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, {n} new tokens each: "
          f"batch 1 {rate['batch 1']:.1f} tok/s, batch 8 {rate['batch 8']:.1f} tok/s, "
          f"{rate['batch 8'] / rate['batch 1']:.2f}x; rows identical to alone: {rows_identical}")
    figures["batch8_vs_batch1"] = rate["batch 8"] / rate["batch 1"]
    figures["batch_rows_identical"] = rows_identical

    # 3. compiled decode step vs eager
    if not args.no_compile:
        ids = torch.tensor([prompts[3]])
        start = time.perf_counter()
        compiled.generate(ids, max_new_tokens=2); generate_batch(compiled, prompts, 2)
        print(f"\ncompile_decode: first calls (compiling) {time.perf_counter() - start:.1f} s")
        for label, run in (("batch 1", lambda m: m.generate(ids, max_new_tokens=n)),
                           ("batch 8", lambda m: generate_batch(m, prompts, n))):
            best = best_of(args.rounds, {"eager": lambda: run(model), "compiled": lambda: run(compiled)})
            same = (torch.equal(best["eager"][1], best["compiled"][1]) if label == "batch 1"
                    else best["eager"][1] == best["compiled"][1])
            ratio = best["eager"][0] / best["compiled"][0]
            print(f"compiled vs eager, {label}: {ratio:.2f}x, tokens identical: {same}")
            figures[f"compile_vs_eager_{label.replace(' ', '')}"] = ratio
    print("targets: spec_speedup >= 1.5 with spec_identical=True; batch8_vs_batch1 >= 4")
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


def _spec(model, ids, args, draft, num_draft, stops):
    "Speculative greedy generation: (output, stats)."
    stats = SpeculationStats()
    out = speculative_generate(model, ids, args.new_tokens, draft, num_draft, eos_token_id=stops, stats=stats)
    return out, stats


if __name__ == "__main__":
    main()
