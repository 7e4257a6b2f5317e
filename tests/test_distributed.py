"""Data-parallel training: torchrun with 2 CPU processes (gloo) ends with the weights of one process with the same global batch."""
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from llm_book.training.distributed import DDP_CHECK_SCRIPT, child_env, launch


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
