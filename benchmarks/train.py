"""Training benchmark: nanoGPT's CPU recipe on tiny-shakespeare (character level) with llm_book's Trainer.

Recipe (nanoGPT README, "I only have a macbook"): GPT-2 architecture, 4 layers, 4 heads, 128 dims, block 64,
batch 12, no dropout, no biases, lr 1e-3 cosine to 1e-4 over the run, warm-up 100, beta2 0.99, weight decay 0.1,
grad clip 1.0, 2000 steps, 90/10 split. Targets (issue 11), each measured in this run and printed as a ratio:
a training step of our GPT2 no slower than 0.75x Transformers' `GPT2LMHeadModel` (sdpa) of the same shape (plain
loops, alternating step by step); a Trainer step no slower than a plain PyTorch loop over the same model; and the
recipe's val loss (200-batch estimate) <= 1.91 as the mean of `--seeds` runs (3 by default), each printed.
Also printed: peak memory and model FLOPs utilisation against this machine's measured matmul throughput.
Also: `Trainer(compile=True)` (`llm_book train --compile`) against eager, alternating step by step after the compile,
with the one-off compile time; it says whether compiling wins on this machine.
Run: .venv/bin/python benchmarks/train.py [--steps N]; the last line is `val_loss=<float> ms_per_step=<median>`.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_book.datasets.text_dataset import TextDataset, train_val_split
from llm_book.models.configs import get_config
from llm_book.models.gpt import GPT2
from llm_book.tokenizers.char_tokenizer import CharTokenizer
from llm_book.training.optimizer import configure_optimizer
from llm_book.training.metrics import measure_matmul_flops, peak_memory_mb, training_flops_per_token
from llm_book.training.trainer import Trainer

DATA = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
BLOCK, BATCH = 64, 12


def make_model(vocab_size, seed=1337):
    torch.manual_seed(seed)
    config = get_config("gpt2", vocab_size=vocab_size, embed_dim=128, num_heads=4, num_layers=4, hidden_dim=512,
                        max_position_embeddings=BLOCK, dropout=0.0, bias=False)
    return GPT2(config)


class PlainLoop:
    "A plain nanoGPT-style training step: random windows, forward, backward, clip, AdamW step."
    def __init__(self, model, train_ids, forward=None):
        self.model, self.train_ids = model, train_ids
        self.forward = forward or model          # ids (B, T) -> logits (B, T, V)
        self.optimizer = configure_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
        self.generator = torch.Generator().manual_seed(0)

    def step(self):
        starts = torch.randint(len(self.train_ids) - BLOCK - 1, (BATCH,), generator=self.generator)
        x = torch.stack([self.train_ids[s : s + BLOCK] for s in starts])
        y = torch.stack([self.train_ids[s + 1 : s + 1 + BLOCK] for s in starts])
        loss = F.cross_entropy(self.forward(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def compare_step_times(vocab_size, train_ids, train_ds, steps):
    "Median ms per step of the Trainer and of the plain loop, alternating step by step so load spikes hit both."
    plain = PlainLoop(make_model(vocab_size), train_ids)
    trainer = Trainer(make_model(vocab_size), train_ds, max_steps=steps, batch_size=BATCH, lr=1e-3, min_lr=1e-4,
                      warmup_steps=10, beta2=0.99, eval_interval=0, progress=False)
    plain_times = []
    for _ in range(steps):
        started = time.perf_counter(); plain.step(); plain_times.append((time.perf_counter() - started) * 1000)
        trainer.train_step()
    skip = min(5, steps // 4)   # warm-up steps
    return statistics.median(trainer.step_times[skip:]), statistics.median(plain_times[skip:])


def compare_compile(vocab_size, train_ds, steps):
    "(compile seconds, median ms per step eager, median ms per step compiled): the same model and batches, alternating."
    trainers = {compile: Trainer(make_model(vocab_size), train_ds, max_steps=steps + 3, batch_size=BATCH, lr=1e-3, min_lr=1e-4,
                                 warmup_steps=10, beta2=0.99, eval_interval=0, progress=False, compile=compile)
                for compile in (False, True)}
    started = time.perf_counter()
    for _ in range(3): trainers[True].train_step()   # the first steps compile (forward, backward, and a recompile or two)
    compile_seconds = time.perf_counter() - started
    trainers[False].step_times.clear(); trainers[True].step_times.clear()
    for _ in range(3): trainers[False].train_step()  # the eager one catches up to the same step
    trainers[False].step_times.clear()
    for _ in range(steps):
        trainers[False].train_step(); trainers[True].train_step()
    return compile_seconds, statistics.median(trainers[False].step_times), statistics.median(trainers[True].step_times)


def compare_with_transformers(vocab_size, train_ids, steps):
    "Median ms per plain training step: our GPT2 vs Transformers' GPT2LMHeadModel (sdpa), same shape, alternating."
    import transformers
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(1337)
    hf_config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4,
                                        n_inner=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        activation_function="gelu_new")
    hf_config._attn_implementation = "sdpa"
    hf_model = transformers.GPT2LMHeadModel(hf_config)
    ours, theirs = PlainLoop(make_model(vocab_size), train_ids), PlainLoop(hf_model, train_ids, lambda x: hf_model(x).logits)
    our_times, hf_times = [], []
    for _ in range(steps):
        for loop, times in ((ours, our_times), (theirs, hf_times)):
            started = time.perf_counter(); loop.step(); times.append((time.perf_counter() - started) * 1000)
    skip = min(5, steps // 4)
    return statistics.median(our_times[skip:]), statistics.median(hf_times[skip:])


def train_recipe(tokenizer, train_ds, val_ds, steps, seed):
    "One run of the recipe with the Trainer; returns (model, trainer, final val loss on 200 batches, seconds)."
    model = make_model(tokenizer.vocab_size, seed)
    warmup = min(100, steps // 5)
    trainer = Trainer(model, train_ds, val_ds, max_steps=steps, batch_size=BATCH, lr=1e-3, min_lr=1e-4, warmup_steps=warmup,
                      beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=max(steps // 4, 1), eval_batches=20,
                      log_interval=50, progress=False, seed=seed)
    started = time.time()
    for row in trainer.fit():
        if row["split"] == "val": print(f"  seed {seed} step {row['step']:5d}: val loss {row['loss']:.4f}")
    train_seconds = time.time() - started
    return model, trainer, trainer.evaluate(num_batches=200)["loss"], train_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--timing-steps", type=int, default=100, help="steps of each loop in the speed comparison")
    parser.add_argument("--compile-steps", type=int, default=100, help="steps of eager and compiled training compared (0: skip)")
    parser.add_argument("--seeds", type=int, default=3, help="recipe runs (seeds 1337, 1338, ...); the mean val loss counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads: torch.set_num_threads(args.threads)

    text = DATA.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.train(text)
    train_ids, val_ids = train_val_split(tokenizer.encode(text), 0.1)
    train_ds, val_ds = TextDataset(train_ids, BLOCK, stride=1), TextDataset(val_ids, BLOCK, stride=1)
    print(f"tiny-shakespeare: {len(text):,} characters, vocab {tokenizer.vocab_size}, train {len(train_ids):,} / val {len(val_ids):,} tokens; "
          f"torch threads {torch.get_num_threads()}")

    # 1. Speed: Trainer vs a plain loop over the same model, alternating step by step so machine noise hits both alike.
    our_ms, plain_ms = compare_step_times(tokenizer.vocab_size, train_ids, train_ds, args.timing_steps)
    print(f"step time ({args.timing_steps} alternating steps each): Trainer {our_ms:.1f} ms, plain PyTorch loop {plain_ms:.1f} ms, "
          f"ratio Trainer/plain {our_ms / plain_ms:.3f}")

    # 1b. Speed: our model vs Transformers' GPT-2 (sdpa) of the same shape, plain loops, alternating.
    gpt2_ms, hf_ms = compare_with_transformers(tokenizer.vocab_size, train_ids, args.timing_steps)
    print(f"step time ({args.timing_steps} alternating steps each): llm_book GPT2 {gpt2_ms:.1f} ms, "
          f"Transformers GPT2LMHeadModel (sdpa) {hf_ms:.1f} ms, ratio {gpt2_ms / hf_ms:.3f}")

    # 1c. torch.compile against eager, the same recipe model.
    if args.compile_steps:
        compile_s, eager_ms, compiled_ms = compare_compile(tokenizer.vocab_size, train_ds, args.compile_steps)
        device = "GPU" if torch.cuda.is_available() else "CPU"
        verdict = (f"compiling wins, and pays for its compile time after {compile_s * 1000 / (eager_ms - compiled_ms):.0f} steps"
                   if compiled_ms < eager_ms else "compiling does not win here")
        print(f"torch.compile ({args.compile_steps} alternating steps each, after {compile_s:.0f} s of compiling): eager {eager_ms:.1f} ms, "
              f"compiled {compiled_ms:.1f} ms, speed-up {eager_ms / compiled_ms:.2f}x on this {device}: {verdict}")

    # 2. The recipe: 2000 steps with the Trainer, once per seed.
    losses = []
    for seed in range(1337, 1337 + args.seeds):
        model, trainer, loss, train_seconds = train_recipe(tokenizer, train_ds, val_ds, args.steps, seed)
        losses.append(loss)
        print(f"seed {seed}: final val loss (200 batches) {loss:.4f}")
    final = {"loss": statistics.mean(losses)}
    run_ms = statistics.median(trainer.step_times)

    # 3. Model FLOPs utilisation against this machine's measured fp32 matmul rate.
    num_params = sum(p.numel() for p in model.parameters()) - model.position_embeddings.embedding.weight.numel()
    flops_per_token = training_flops_per_token(num_params, 4, 128, BLOCK)
    achieved = flops_per_token * BATCH * BLOCK / (run_ms / 1000)
    peak = measure_matmul_flops(1024, repeats=10)
    print(f"model: {num_params:,} non-position parameters; {flops_per_token / 1e6:.2f} MFLOP per token; "
          f"achieved {achieved / 1e9:.2f} GFLOP/s vs measured matmul peak {peak / 1e9:.1f} GFLOP/s: MFU {100 * achieved / peak:.1f}%")
    print(f"peak memory (max RSS): {peak_memory_mb():.0f} MB; {args.steps} steps in {train_seconds:.0f} s")
    print(f"val loss (200 batches), mean of {len(losses)} seeds ({', '.join(f'{l:.4f}' for l in losses)}): {final['loss']:.4f} "
          f"(target <= 1.91: {'met' if final['loss'] <= 1.91 else 'NOT met'}); "
          f"Trainer/plain step-time ratio {our_ms / plain_ms:.3f} (target <= 1: {'met' if our_ms <= plain_ms else 'not met (noise?)'}); "
          f"GPT2/Transformers step-time ratio {gpt2_ms / hf_ms:.3f} (target <= 0.75: {'met' if gpt2_ms <= 0.75 * hf_ms else 'NOT met'})")
    print(f"val_loss={final['loss']:.4f} ms_per_step={run_ms:.2f}")


if __name__ == "__main__":
    main()
