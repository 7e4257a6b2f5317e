"""LoRA fine-tuning of SmolLM2-135M-Instruct on CPU: exact-match accuracy on a held-out arithmetic split, before and after.

The task and its split come from `llm_book.finetune.evaluation.arithmetic_chats` (a seeded generator; the held-out
questions are never trained on). The run: greedy exact match of the base model on the held-out split, LoRA adapters
on every projection (`--rank`), SFT with the book's Trainer on the assistant tokens only (stopped by `--max-minutes`
if it has not reached `--steps`), merge, exact match again, export to GGUF (f16) and, where llama-cpp-python is
installed, a check that llama.cpp decodes the same greedy tokens as our model on held-out prompts.

    python benchmarks/finetune.py [--steps 150] [--max-minutes 10] [--rank 4] [--threads 2]

Last line: `acc_before=… acc_after=… minutes=… trainable_share=… llamacpp_same_greedy=yes|no|skipped`.
"""
import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from llm_book.finetune.evaluation import answers, arithmetic_chats, exact_match
from llm_book.finetune.export import save_gguf
from llm_book.finetune.lora import add_lora, merge_lora
from llm_book.finetune.sft import SFTDataset
from llm_book.gguf import load_gguf
from llm_book.training.metrics import peak_memory_mb
from llm_book.training.trainer import Trainer


def llama_cpp_same_greedy(path, model, tokenizer, chats, new_tokens=8) -> str:
    "'yes' if llama.cpp decodes the same greedy tokens as `model` on every prompt, 'no' if not, 'skipped' without llama_cpp."
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed (the `bench` extra): llama.cpp check skipped")
        return "skipped"
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=torch.get_num_threads(), verbose=False)
    same = True
    for chat in chats:
        prompt = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True)
        with torch.no_grad(): ours = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens)[0, len(prompt):].tolist()
        theirs = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            theirs.append(token)
            if len(theirs) == new_tokens: break
        llm.reset()
        if theirs != ours:
            same = False
            print(f"llama.cpp differs: ours {tokenizer.decode(ours)!r}, llama.cpp {tokenizer.decode(theirs)!r}")
    return "yes" if same else "no"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--max-minutes", type=float, default=10.0)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval", type=int, default=None, help="held-out questions to score (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train, held = arithmetic_chats(seed=args.seed)
    held = held[:args.eval] if args.eval else held
    model, tokenizer = load_gguf()
    print(f"task: {len(train)} training chats, {len(held)} held-out")
    acc_before = exact_match(answers(model, tokenizer, held), held)
    print(f"exact match before: {acc_before:.3f}")

    add_lora(model, rank=args.rank, alpha=args.alpha)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = SFTDataset(train, tokenizer, max_length=64)
    trainer = Trainer(model, data, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(10, args.steps // 10),
                      weight_decay=0.0, log_interval=10, progress=False, device="cpu", mixed_precision="no",
                      max_minutes=args.max_minutes, seed=args.seed)
    started = time.time()
    trainer.fit()
    minutes = (time.time() - started) / 60
    tokens_per_s = trainer.tokens_seen / (minutes * 60)
    merge_lora(model)
    replies = answers(model, tokenizer, held)
    acc_after = exact_match(replies, held)
    print(f"exact match after: {acc_after:.3f} ({trainer.step} steps in {minutes:.1f} min, {tokens_per_s:.0f} tokens/s); "
          f"replies e.g. {replies[:5]}")
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f} %); peak memory {peak_memory_mb():.0f} MiB")

    with tempfile.TemporaryDirectory() as tmp:
        path = save_gguf(model, tokenizer, Path(tmp) / "smollm2-arithmetic-f16.gguf", dtype="f16")
        print(f"GGUF written: {path.stat().st_size / 2**20:.0f} MiB")
        exported, _ = load_gguf(path)
        same = llama_cpp_same_greedy(path, exported, tokenizer, held[:4])
    print(f"acc_before={acc_before:.3f} acc_after={acc_after:.3f} minutes={minutes:.1f} "
          f"trainable_share={trainable / total:.4f} llamacpp_same_greedy={same}")


if __name__ == "__main__":
    main()
