"""Data-parallel training: torchrun with 2 CPU processes (gloo) ends with the weights of one process with the same global batch."""
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from llm_book.teaching.distributed_check import DDP_CHECK_SCRIPT
from llm_book.training.distributed import child_env, launch


def test_torchrun_two_processes_match_single_process(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_CHECK_SCRIPT)
    (tmp_path / "single").mkdir(); (tmp_path / "ddp").mkdir()
    # one process, batch 8 ...
    subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "8"], check=True, env=child_env(), timeout=60)
    # ... and two ranks with batch 4 each: the same global batch of 8
    result = launch(script, nproc_per_node=2, args=[tmp_path / "ddp", 4], timeout=90)
    assert result.returncode == 0
    single = load_file(tmp_path / "single" / "weights.safetensors")
    ddp = load_file(tmp_path / "ddp" / "weights.safetensors")
    assert single.keys() == ddp.keys()
    for name in single:
        assert torch.allclose(single[name], ddp[name], atol=1e-5, rtol=0), name
    history = {d: json.loads((tmp_path / d / "history.json").read_text()) for d in ("single", "ddp")}
    single_losses = [(r["step"], r["split"], r["loss"]) for r in history["single"]]
    ddp_losses = [(r["step"], r["split"], r["loss"]) for r in history["ddp"]]
    assert [x[:2] for x in single_losses] == [x[:2] for x in ddp_losses]
    assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(single_losses, ddp_losses))
    assert single_losses[0][2] > single_losses[-2][2]   # it did train


def test_launch_reports_a_failing_rank(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    try:
        launch(script, nproc_per_node=2, timeout=60)
    except RuntimeError as e:
        assert "torchrun exited with" in str(e)
    else:
        raise AssertionError("a failing rank must make launch raise")


# ---- FSDP2, multi-node, timeouts (issue 17) ----
import os
import shutil
import time

import pytest

from llm_book.cli import main as cli_main
from llm_book.teaching.distributed_check import FSDP_CHECK_SCRIPT, tiny_trainer
from llm_book.training.distributed import free_port, multinode_command, setup_distributed
from llm_book.training.checkpoint import read_checkpoint
from llm_book.training.metrics import read_log


def model_weights(path):
    return {k: v for k, v in read_checkpoint(path)[0].items() if k.startswith("model.")}


def log_losses(path):
    return {(r["step"], r["split"]): r["loss"] for r in read_log(path)}


def largest_differences(run_dir, reference_dir, splits=("train", "val")):
    "(max |loss - reference| over the run's log rows of `splits`, max |weight - reference| over the final checkpoint)."
    run_losses, reference_losses = log_losses(run_dir / "log.jsonl"), log_losses(reference_dir / "log.jsonl")
    run_losses = {k: v for k, v in run_losses.items() if k[1] in splits}
    assert set(run_losses) <= set(reference_losses) and run_losses
    weights, reference = model_weights(run_dir / "checkpoint.safetensors"), model_weights(reference_dir / "checkpoint.safetensors")
    assert weights.keys() == reference.keys()
    return (max(abs(run_losses[k] - reference_losses[k]) for k in run_losses),
            max((weights[k] - reference[k]).abs().max().item() for k in reference))


def test_fsdp_two_processes_match_one_and_checkpoints_resume_across_world_sizes(tmp_path):
    single = tiny_trainer(tmp_path / "single", 8)   # one process, batch 8, 8 steps; its step-4 checkpoint kept
    single.fit(4)
    (tmp_path / "single_step4").mkdir()
    shutil.copy(single.checkpoint_path, tmp_path / "single_step4" / "checkpoint.safetensors")
    single.fit()
    script = tmp_path / "fsdp_check.py"
    script.write_text(FSDP_CHECK_SCRIPT)
    launch(script, nproc_per_node=2, args=[tmp_path, 4], timeout=150)   # FSDP, 2 x batch 4: the same global batch
    (tmp_path / "fsdp_to_single").mkdir()   # the sharded run's step-4 checkpoint, resumed by one process
    shutil.copy(tmp_path / "fsdp_step4.safetensors", tmp_path / "fsdp_to_single" / "checkpoint.safetensors")
    tiny_trainer(tmp_path / "fsdp_to_single", 8, resume=True).fit()

    assert [r["step"] for r in read_log(tmp_path / "fsdp" / "log.jsonl") if r["split"] == "train"] == list(range(1, 9))
    for run in ["fsdp", "single_step4", "fsdp_to_single", "fsdp_accum"]:   # sharded; single -> sharded; sharded -> single; accumulation
        # gradient accumulation evaluates with its smaller micro-batch (other windows): compare its training losses
        loss_diff, weight_diff = largest_differences(tmp_path / run, tmp_path / "single", ("train",) if run == "fsdp_accum" else ("train", "val"))
        print(f"{run} vs one process: max |loss difference| {loss_diff:.1e}, max |weight difference| {weight_diff:.1e}")
        assert loss_diff < 1e-5 and weight_diff < 1e-5, (run, loss_diff, weight_diff)
    assert min(r["step"] for r in read_log(tmp_path / "single_step4" / "log.jsonl")) == 5   # it did resume at step 4
    # bf16 compute with fp32 reduction: close to fp32 but not equal (the policy is in effect); stored weights stay fp32
    loss_diff, weight_diff = largest_differences(tmp_path / "fsdp_bf16", tmp_path / "single")
    assert 1e-5 < loss_diff < 5e-2, loss_diff
    assert {t.dtype for t in model_weights(tmp_path / "fsdp_bf16" / "checkpoint.safetensors").values()} == {torch.float32}
    losses = [r["loss"] for r in read_log(tmp_path / "single" / "log.jsonl") if r["split"] == "train"]
    assert losses[-1] < losses[0]   # it did train


CLI_TRAIN = ["train", "--model", "llama-tiny", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1",
             "--hidden-dim", "64", "--dropout", "0", "--block-size", "16", "--steps", "6", "--eval-interval", "3",
             "--eval-batches", "2", "--log-interval", "1", "--warmup-steps", "2", "--no-progress"]


def write_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i} plus {j} is {i + j}.\n" for i in range(30) for j in range(30)))
    return corpus


def test_two_torchrun_agents_on_a_c10d_rendezvous_train_as_one_process(tmp_path):
    "Two 'nodes' (torchrun agents on 127.0.0.1, one process each) run `llm_book train --fsdp`; one process runs it alone."
    corpus = write_corpus(tmp_path)
    assert cli_main([*CLI_TRAIN, "--data", str(corpus), "--out", str(tmp_path / "single"), "--batch-size", "8"]) == 0
    worker = ["-m", "llm_book.cli", *CLI_TRAIN, "--data", corpus, "--out", tmp_path / "two_nodes", "--global-batch-size", "8",
              "--fsdp", "--dist-timeout", "60"]
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen(multinode_command(worker, nnodes=2, nproc_per_node=1, rdzv_endpoint=endpoint, rdzv_id="two-nodes",
                                                 join_timeout=60, is_host=node == 0),
                               env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for node in range(2)]
    try: outputs = [agent.communicate(timeout=120) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None: agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "2 processes x batch 4 (FSDP)" in outputs[0][0] + outputs[1][0]
    loss_diff, weight_diff = largest_differences(tmp_path / "two_nodes", tmp_path / "single")
    print(f"two nodes vs one process: max |loss difference| {loss_diff:.1e}, max |weight difference| {weight_diff:.1e}")
    assert loss_diff < 1e-5 and weight_diff < 1e-5, (loss_diff, weight_diff)
    assert len(read_log(tmp_path / "two_nodes" / "log.jsonl")) == len(read_log(tmp_path / "single" / "log.jsonl"))


def test_a_node_alone_at_the_rendezvous_fails_after_the_join_timeout(tmp_path):
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('the workers must not start without the other node')\n")
    started = time.time()
    result = subprocess.run(multinode_command([script], nnodes=2, nproc_per_node=1, rdzv_endpoint=f"127.0.0.1:{free_port()}",
                                              join_timeout=3, is_host=True),
                            capture_output=True, text=True, timeout=60, env=child_env())
    assert result.returncode != 0 and time.time() - started < 60
    assert "RendezvousTimeoutError" in result.stderr, result.stderr[-2000:]


def test_a_rank_without_its_rendezvous_gets_a_clear_error_within_the_timeout(tmp_path):
    env = child_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "llm_book.cli", "train", "--data", str(write_corpus(tmp_path)),
                             "--out", str(tmp_path / "run"), "--dist-timeout", "2"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and time.time() - started < 60
    last_line = result.stderr.strip().splitlines()[-1]
    assert "could not join the rendezvous at 127.0.0.1:" in last_line and "within 2 s" in last_line, last_line


RANK_FAILURE_SCRIPT = """
import os, sys, time
from llm_book.teaching.distributed_check import tiny_trainer
from llm_book.training.distributed import setup_distributed
info = setup_distributed()
trainer = tiny_trainer(None, 4, steps=50, fsdp=True)
for step in range(50):
    if info.rank == 1 and step == 3:
        if sys.argv[1] == "dies": os._exit(1)
        time.sleep(300)   # hangs: only the timeout can stop rank 0
    trainer.train_step()
"""


@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_stops_the_others(tmp_path, failure):
    script = tmp_path / "failing_rank.py"
    script.write_text(RANK_FAILURE_SCRIPT)
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), failure],
                            capture_output=True, text=True, timeout=90, env=child_env(OMP_NUM_THREADS="1", LLM_BOOK_DIST_TIMEOUT="2"))
    assert result.returncode != 0 and time.time() - started < 90
    if failure == "hangs":   # rank 0's collective gave up after the configured 2 s
        assert "Timed out" in result.stderr or "timed out" in result.stderr, result.stderr[-3000:]


def test_train_fsdp_bad_input(tmp_path, monkeypatch, capsys):
    corpus = str(write_corpus(tmp_path))
    for name in ("RANK", "WORLD_SIZE"): monkeypatch.delenv(name, raising=False)
    assert cli_main([*CLI_TRAIN, "--data", corpus, "--out", str(tmp_path / "a"), "--fsdp"]) == 2
    assert "--fsdp shards the model across processes that torchrun starts" in capsys.readouterr().err
    assert cli_main([*CLI_TRAIN, "--data", corpus, "--out", str(tmp_path / "b"), "--fsdp-bf16"]) == 2
    assert "it needs --fsdp" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0"); monkeypatch.setenv("WORLD_SIZE", "3")   # checked before any rendezvous is attempted
    assert cli_main([*CLI_TRAIN, "--data", corpus, "--out", str(tmp_path / "c"), "--global-batch-size", "8"]) == 2
    assert "--global-batch-size 8 cannot be split evenly over WORLD_SIZE=3 processes" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_fsdp_trainer_needs_a_process_group():
    with pytest.raises(ValueError, match="launch under torchrun"):
        tiny_trainer(None, 4, fsdp=True)
    with pytest.raises(ValueError, match="fsdp_mixed_precision=True needs fsdp=True"):
        tiny_trainer(None, 4, fsdp_mixed_precision=True)


def test_a_checkpoint_from_another_world_size_resumes_only_with_the_same_global_batch(tmp_path):
    from llm_book.training.checkpoint import atomic_save_safetensors, with_checksums
    tiny_trainer(tmp_path / "run", 8, steps=4).fit(2)
    path = tmp_path / "run" / "checkpoint.safetensors"
    tensors, metadata = read_checkpoint(path)   # as if 2 processes x batch 4 had written it (the same global batch of 8)
    config = json.loads(metadata["trainer_config"]); config["batch_size"] = 4
    two = lambda key: json.dumps(json.loads(metadata[key]) * 2)   # one rng state and data position per process
    metadata = {**{k: v for k, v in metadata.items() if k != "checksums"}, "world_size": "2", "trainer_config": json.dumps(config),
                "rng": two("rng"), "data": two("data")}
    atomic_save_safetensors(tensors, with_checksums(tensors, metadata), path)
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) x batch_size 4 = a global batch of 8; this run has 1 x 4 = 4.*use batch_size 8"):
        tiny_trainer(tmp_path / "run", 4, steps=4, resume=True)
    resumed = tiny_trainer(tmp_path / "run", 8, steps=4, resume=True)
    assert resumed.step == 2 and resumed.data_position == 2 * 8
