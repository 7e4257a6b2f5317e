"""The llm_book console script: --help everywhere, a tiny train + generate through subprocesses, bad input, a killed run."""
import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_book.cli import main
from llm_book.training.trainer import read_checkpoint, read_log

SCRIPT = Path(sys.executable).parent / "llm_book"
ROOT = Path(__file__).resolve().parent.parent


def llm_book(*args, timeout=120, **kwargs):
    "Run the console script (falling back to `python -c` if it is not installed)."
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", "import sys; from llm_book.cli import main; sys.exit(main())"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def run_main(*args):
    "Call `main` in-process; return (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = main([str(a) for a in args])
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_text):
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(shakespeare_text[:30_000])
    return path


TINY = ["--steps", "12", "--block-size", "32", "--batch-size", "8", "--eval-interval", "6", "--eval-batches", "2",
        "--warmup-steps", "2", "--no-progress", "--model", "llama-tiny"]


def test_help_for_every_subcommand():
    result = llm_book("--help")
    assert result.returncode == 0
    for command in ("train", "generate", "chat", "tokenize", "demo"): assert command in result.stdout
    for command in (["train"], ["generate"], ["tokenize"], ["tokenize", "train"], ["tokenize", "apply"], ["demo"]):
        code, out, _ = run_main(*command, "--help")
        assert code == 0 and out.startswith(f"usage: llm_book {' '.join(command)}"), command


def test_chat_subcommand_hands_over_or_says_why():
    code, out, err = run_main("chat", "--help")
    if importlib.util.find_spec("llm_book.chat") is None:
        assert code == 1 and "llm_book chat is not available" in err
    else:
        assert code == 0 and "usage" in (out + err).lower()


def test_train_then_generate_via_the_console_script(corpus, tmp_path):
    run = tmp_path / "run"
    result = llm_book("train", "--data", corpus, "--out", run, *TINY)
    assert result.returncode == 0, result.stderr
    assert "final val loss" in result.stdout
    assert {p.name for p in run.iterdir()} == {"checkpoint.safetensors", "log.jsonl", "loss.png", "model_config.json", "tokenizer.json"}
    rows = read_log(run / "log.jsonl")
    assert [r["step"] for r in rows if r["split"] == "val"] == [6, 12]
    assert json.loads((run / "model_config.json").read_text())["architecture"] == "llama"
    result = llm_book("generate", "--run", run, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) > len("ROMEO:") + 10


def test_tokenize_train_and_apply(corpus, tmp_path):
    code, out, err = run_main("tokenize", "train", "--data", corpus, "--kind", "bpe", "--vocab-size", "300", "--out", tmp_path / "tok.json")
    assert code == 0, err
    code, out, err = run_main("tokenize", "apply", "--tokenizer", tmp_path / "tok.json", "--data", corpus, "--out", tmp_path / "ids.npy")
    assert code == 0, err
    import numpy as np
    from llm_book.tokenizers.bpe_tokenizer import BPETokenizer
    ids = np.load(tmp_path / "ids.npy")
    assert ids.dtype == np.uint16 and ids.tolist() == BPETokenizer.load(tmp_path / "tok.json").encode(corpus.read_text())


def test_bad_input(corpus, tmp_path):
    code, _, err = run_main("train", "--data", tmp_path / "missing.txt", "--out", tmp_path / "a", *TINY)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_main("train", "--data", tmp_path / "empty.txt", "--out", tmp_path / "b", *TINY)
    assert code == 2 and "is empty" in err
    (tmp_path / "short.txt").write_text("To be, or not to be: that is the question.\n")
    code, _, err = run_main("train", "--data", tmp_path / "short.txt", "--out", tmp_path / "c", *TINY)
    assert code == 2 and "fewer than block_size + 1 = 33" in err
    code, _, err = run_main("train", "--data", corpus, "--out", tmp_path / "d", "--model", "gpt5")
    assert code == 2 and "neither a preset" in err
    code, _, err = run_main("generate", "--run", tmp_path / "nothing", "--prompt", "x")
    assert code == 2 and "has no checkpoint.safetensors" in err


def test_truncated_checkpoint_and_other_architecture(corpus, tmp_path):
    run = tmp_path / "run"
    assert run_main("train", "--data", corpus, "--out", run, *TINY, "--steps", "4")[0] == 0
    checkpoint = run / "checkpoint.safetensors"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[: len(good) // 3])
    code, _, err = run_main("generate", "--run", run, "--prompt", "ROMEO")
    assert code == 2 and "is truncated or corrupt" in err
    checkpoint.write_bytes(good)
    config = json.loads((run / "model_config.json").read_text())
    (run / "model_config.json").write_text(json.dumps({**config, "num_layers": 3}))   # another architecture
    code, _, err = run_main("train", "--data", corpus, "--out", run, *TINY, "--resume")
    assert code == 2 and "does not fit this Llama" in err


def test_killed_run_leaves_a_resumable_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", corpus, "--out", run, *TINY, "--steps", "400", "--checkpoint-interval", "3", "--eval-interval", "200"]
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", "import sys; from llm_book.cli import main; sys.exit(main())"]
    process = subprocess.Popen(command + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            if (run / "checkpoint.safetensors").exists():
                step = int(read_checkpoint(run / "checkpoint.safetensors")[1]["step"])
                if step >= 6: break
            time.sleep(0.2)
        else: pytest.fail("no checkpoint within 90 s")
    finally:
        process.send_signal(signal.SIGKILL)   # no chance to clean up
        process.wait()
    assert process.returncode == -signal.SIGKILL
    _, metadata = read_checkpoint(run / "checkpoint.safetensors")   # intact
    killed_at = int(metadata["step"])
    end = killed_at + 12   # a shorter plan than the killed run's, to keep the test quick
    code, out, err = run_main("train", "--data", corpus, "--out", run, *TINY, "--steps", end, "--resume", "--log-interval", "1")
    assert code == 0, err
    assert f"resuming at step {killed_at}" in out
    steps = [r["step"] for r in read_log(run / "log.jsonl") if r["split"] == "train"]
    assert steps[-1] == end and steps == sorted(set(steps))   # one log, no step twice
