"""Tokenizer benchmark: BPE training and encoding speed against Hugging Face `tokenizers`, measured in the same run.

Targets (issue): pure-Python training within 10x of `tokenizers`' BpeTrainer (tinyshakespeare, vocab 4096);
pure-Python encoding >= 1 MB/s; the tiktoken path at least as fast as `tokenizers` on the same vocabulary.
Run: .venv/bin/python benchmarks/tokenizer.py
"""
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm_book.gguf import smollm2_path
from llm_book.tokenizers.bpe_tokenizer import BPETokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
VOCAB_SIZE = 4096
SPECIALS = ["<|endoftext|>"]


def best_time(fn, repeats=3):
    "Best wall time of `repeats` calls, and the last result."
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def train_hf(text):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def main():
    text = DATA.read_text(encoding="utf-8")
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"corpus: {DATA.name}, {megabytes:.2f} MB; vocab_size {VOCAB_SIZE}")

    # ---- training ----
    hf_seconds, hf_tok = best_time(lambda: train_hf(text), repeats=2)
    ours_seconds, ours = best_time(lambda: BPETokenizer.train(text, VOCAB_SIZE, special_tokens=SPECIALS), repeats=1)
    print(f"train  tokenizers BpeTrainer: {hf_seconds:6.2f} s | llm_book (pure Python): {ours_seconds:6.2f} s "
          f"| ratio {ours_seconds / hf_seconds:5.2f}x (target <= 10x)")
    print(f"       vocab sizes: tokenizers {hf_tok.get_vocab_size()}, llm_book {ours.vocab_size}")

    # ---- encoding, same vocabulary in all three ----
    with tempfile.TemporaryDirectory() as d:
        ours.save_hf(d)
        hf_same = Tokenizer.from_file(str(Path(d)/"tokenizer.json"))

    def python_cold():
        ours._cache.clear()
        return ours.encode_ordinary_python(text)
    py_seconds, py_ids = best_time(python_cold)
    tk_seconds, tk_ids = best_time(lambda: ours.encode_ordinary_tiktoken(text))
    hf_enc_seconds, hf_enc = best_time(lambda: hf_same.encode(text))
    assert py_ids == tk_ids == hf_enc.ids, "the three encoders disagree"
    print(f"encode (trained vocab {VOCAB_SIZE}, {len(py_ids)} tokens, {len(py_ids) / (megabytes * 1e6):.3f} tokens/byte, "
          f"{megabytes * 1e6 / len(py_ids):.2f} bytes/token)")
    print(f"       pure Python (cold cache): {megabytes / py_seconds:6.2f} MB/s (target >= 1)")
    print(f"       tiktoken path:            {megabytes / tk_seconds:6.2f} MB/s")
    print(f"       tokenizers:               {megabytes / hf_enc_seconds:6.2f} MB/s "
          f"| tiktoken / tokenizers speed {hf_enc_seconds / tk_seconds:5.2f}x (target >= 1)")

    # ---- batches: tokenizers parallelises encode_batch over its Rust threads ----
    paragraphs = text.split("\n\n")
    ours_batch, ours_batch_ids = best_time(lambda: ours.encode_batch(paragraphs))
    hf_batch, hf_batch_enc = best_time(lambda: hf_same.encode_batch(paragraphs))
    assert ours_batch_ids == [e.ids for e in hf_batch_enc], "encode_batch disagrees"
    print(f"       encode_batch ({len(paragraphs)} paragraphs): llm_book {megabytes / ours_batch:6.2f} MB/s | "
          f"tokenizers {megabytes / hf_batch:6.2f} MB/s | ratio {hf_batch / ours_batch:5.2f}x")

    # ---- encoding with the real SmolLM2 vocabulary (ranks != ids) ----
    try: gguf = smollm2_path()
    except (ModuleNotFoundError, FileNotFoundError): gguf = None
    if gguf is not None:
        smol = BPETokenizer.from_gguf(gguf)
        with tempfile.TemporaryDirectory() as d:
            smol.save_hf(d)
            hf_smol = Tokenizer.from_file(str(Path(d)/"tokenizer.json"))
        smol.tiktoken_encoding()   # build once, outside the timing

        def smol_python_cold():
            smol._cache.clear()
            return smol.encode_ordinary_python(text)
        s_py, s_py_ids = best_time(smol_python_cold, repeats=2)
        s_tk, s_tk_ids = best_time(lambda: smol.encode_ordinary_tiktoken(text))
        s_hf, s_hf_enc = best_time(lambda: hf_smol.encode(text))
        assert s_py_ids == s_tk_ids == s_hf_enc.ids, "SmolLM2: the three encoders disagree"
        print(f"encode SmolLM2 vocab 49152 ({len(s_py_ids) / (megabytes * 1e6):.3f} tokens/byte): "
              f"pure Python {megabytes / s_py:.2f} MB/s | tiktoken {megabytes / s_tk:.2f} MB/s | "
              f"tokenizers {megabytes / s_hf:.2f} MB/s | tiktoken / tokenizers {s_hf / s_tk:.2f}x")


if __name__ == "__main__":
    main()
