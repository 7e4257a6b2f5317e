"""Training: datasets (sharding, resume), optimizer groups, schedules, the trainer's exact resume, checkpoints, NaN stop."""
import json
import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from llm_book.datasets.streaming_text_dataset import StreamingTextDataset
from llm_book.datasets.text_dataset import TextDataset, read_text_file, save_token_ids, train_val_split
from llm_book.tokenizers.char_tokenizer import CharTokenizer
from llm_book.training import checkpoint as checkpoint_module
from llm_book.training.optimizer import configure_optimizer, split_decay_parameters
from llm_book.training.scheduler import cosine_schedule, get_scheduler
from checkpoint_files import rewrite_checkpoint, tensor_byte_range
from llm_book.training.plots import plot_losses
from llm_book.training.checkpoint import load_model_weights, read_checkpoint
from llm_book.training.metrics import read_log, write_csv
from llm_book.training.trainer import NonFiniteLossError, Trainer


class TinyLM(nn.Module):
    "Embedding, causal attention, an MLP with dropout, a tied head: maps (B, T) ids to (B, T, V) logits."
    def __init__(self, vocab_size, embed_dim=32, block_size=32, dropout=0.1):
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab_size, embed_dim)
        self.position_embeddings = nn.Embedding(block_size, embed_dim)
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 64), nn.GELU(), nn.Dropout(dropout), nn.Linear(64, embed_dim))
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)
        self.lm_head.weight = self.token_embeddings.weight
        for table in (self.token_embeddings, self.position_embeddings): nn.init.normal_(table.weight, std=0.02)

    def forward(self, input_ids):
        x = self.token_embeddings(input_ids) + self.position_embeddings(torch.arange(input_ids.shape[1]))
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.lm_head(x + self.mlp(self.norm(x)))


@pytest.fixture(scope="module")
def corpus(shakespeare_text):
    text = shakespeare_text[:20_000]
    tokenizer = CharTokenizer.train(text)
    train_ids, val_ids = train_val_split(tokenizer.encode(text), 0.1)
    return text, tokenizer, train_ids, val_ids


def make_model(vocab_size, **kwargs):
    torch.manual_seed(0)
    return TinyLM(vocab_size, **kwargs)


def run(corpus, out_dir, stop_at=None, resume=False, train_data=None, model_factory=None, **overrides):
    _, tokenizer, train_ids, val_ids = corpus
    model = (model_factory or make_model)(tokenizer.vocab_size)
    train_data = train_data() if train_data else TextDataset(train_ids, 16, stride=1)
    settings = dict(max_steps=16, batch_size=4, warmup_steps=4, eval_interval=4, eval_batches=2, log_interval=1,
                    progress=False, lr=3e-3)
    trainer = Trainer(model, train_data, TextDataset(val_ids, 16), out_dir=out_dir, resume=resume, **{**settings, **overrides})
    trainer.fit(stop_at)
    return trainer


def losses(trainer):
    return [(r["step"], r["split"], r["loss"]) for r in trainer.history]


def assert_same_run(a, b):
    assert [x[:2] for x in losses(a)] == [x[:2] for x in losses(b)]
    for (_, _, loss_a), (_, _, loss_b) in zip(losses(a), losses(b)): assert abs(loss_a - loss_b) <= 1e-6
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


# ---- exact resume ------------------------------------------------------------------------------------------
def test_resume_reproduces_uninterrupted_losses(corpus, tmp_path):
    full = run(corpus, tmp_path / "full")
    first = run(corpus, tmp_path / "cut", stop_at=6)   # stops between checkpoints: a checkpoint at step 6
    assert first.step == 6
    resumed = run(corpus, tmp_path / "cut", resume=True)
    assert resumed.step == 16
    assert_same_run(full, resumed)
    # the log file reads as one run: every step once
    steps = [r["step"] for r in read_log(tmp_path / "cut" / "log.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 17))


def test_resume_exact_with_the_book_llama(corpus, tmp_path):
    from llm_book.models.llama import Llama
    def llama(vocab_size):
        torch.manual_seed(0)
        return Llama.from_preset("llama-tiny", vocab_size=vocab_size, dropout=0.1)
    full = run(corpus, tmp_path / "full", model_factory=llama, max_steps=10)
    run(corpus, tmp_path / "cut", stop_at=5, model_factory=llama, max_steps=10)
    resumed = run(corpus, tmp_path / "cut", resume=True, model_factory=llama, max_steps=10)
    assert_same_run(full, resumed)


def test_resume_with_grad_accumulation_and_streaming(corpus, tmp_path):
    _, tokenizer, train_ids, _ = corpus
    path = save_token_ids(train_ids.numpy(), tmp_path / "train.npy")
    stream = lambda: StreamingTextDataset(path, 16, stride=100, shuffle_buffer_size=32, seed=2)
    overrides = dict(train_data=stream, grad_accum_steps=2, max_steps=24)   # 24 steps x 8 windows > one epoch
    full = run(corpus, tmp_path / "full", **overrides)
    run(corpus, tmp_path / "cut", stop_at=9, **overrides)
    resumed = run(corpus, tmp_path / "cut", resume=True, **overrides)
    assert resumed.train_data.epoch >= 1   # the run crossed an epoch boundary
    assert_same_run(full, resumed)


def test_resume_needs_the_same_kind_of_data(corpus, tmp_path):
    run(corpus, tmp_path, stop_at=4)
    _, _, train_ids, _ = corpus
    path = save_token_ids(train_ids.numpy(), tmp_path / "train.npy")
    with pytest.raises(ValueError, match="for a map-style dataset, not a stream"):
        run(corpus, tmp_path, resume=True, train_data=lambda: StreamingTextDataset(path, 16))


# ---- checkpoints -------------------------------------------------------------------------------------------
def test_checkpoint_write_is_atomic(corpus, tmp_path, monkeypatch):
    trainer = run(corpus, tmp_path, stop_at=4)
    good = (tmp_path / "checkpoint.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):   # dies half-way through writing the new file
        with open(filename, "wb") as f: f.write(b"partial")
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "log.jsonl"]   # no temp file left
    monkeypatch.undo()
    resumed = run(corpus, tmp_path, resume=True)
    assert resumed.step == 16


def test_truncated_and_foreign_checkpoints(corpus, tmp_path):
    _, tokenizer, _, _ = corpus
    run(corpus, tmp_path, stop_at=4)
    path = tmp_path / "checkpoint.safetensors"
    for size in (0, 7, path.stat().st_size // 2, path.stat().st_size - 1):
        cut = tmp_path / f"cut{size}.safetensors"
        cut.write_bytes(path.read_bytes()[:size])
        with pytest.raises(ValueError, match="is truncated or corrupt"): read_checkpoint(cut)
    with pytest.raises(ValueError, match="does not fit this TinyLM"):
        load_model_weights(TinyLM(tokenizer.vocab_size, embed_dim=48), path)
    with pytest.raises(ValueError, match="does not fit this Sequential"):
        load_model_weights(nn.Sequential(nn.Linear(2, 2)), path)
    with pytest.raises(ValueError, match="does not exist"): read_checkpoint(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="is not an llm_book trainer checkpoint"): read_checkpoint(other)


def test_tied_weights_stored_once_and_restored_tied(corpus, tmp_path):
    _, tokenizer, _, _ = corpus
    run(corpus, tmp_path, stop_at=2)
    tensors, metadata = read_checkpoint(tmp_path / "checkpoint.safetensors")
    assert "model.lm_head.weight" not in tensors and "model.token_embeddings.weight" in tensors
    assert json.loads(metadata["aliases"]) == {"lm_head.weight": "token_embeddings.weight"}
    model = TinyLM(tokenizer.vocab_size)
    load_model_weights(model, tmp_path / "checkpoint.safetensors")
    assert model.lm_head.weight is model.token_embeddings.weight
    assert torch.equal(model.lm_head.weight, tensors["model.token_embeddings.weight"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    _, tokenizer, train_ids, _ = corpus

    class Exploding(TinyLM):
        calls = 0
        def forward(self, input_ids):
            Exploding.calls += 1
            logits = super().forward(input_ids)
            return logits * float("inf") if Exploding.calls >= 6 else logits

    torch.manual_seed(0)
    trainer = Trainer(Exploding(tokenizer.vocab_size), TextDataset(train_ids, 16), out_dir=tmp_path, max_steps=20,
                      batch_size=4, checkpoint_interval=2, eval_interval=0, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step 6; .*last good checkpoint is .*checkpoint.safetensors"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())   # the bad step was not applied
    _, metadata = read_checkpoint(tmp_path / "checkpoint.safetensors")
    assert metadata["step"] == "4"


# ---- trainer pieces ----------------------------------------------------------------------------------------
def test_trainer_learns_and_logs(corpus, tmp_path):
    trainer = run(corpus, tmp_path, max_steps=30, lr=1e-2)
    val = [r["loss"] for r in trainer.history if r["split"] == "val"]
    assert val[-1] < val[0]
    assert trainer.history[-1]["perplexity"] == pytest.approx(math.exp(val[-1]))
    rows = read_log(tmp_path / "log.jsonl")
    assert rows == trainer.history
    csv_path = write_csv(rows, tmp_path / "log.csv")
    assert csv_path.read_text().splitlines()[0] == "step,split,loss,perplexity,lr,grad_norm,tokens,ms_per_step"
    fig = plot_losses(rows)
    fig.savefig(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_trainer_bad_input(corpus):
    _, tokenizer, train_ids, _ = corpus
    model = make_model(tokenizer.vocab_size)
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        Trainer(model, TextDataset(train_ids[:40], 16), batch_size=8)
    with pytest.raises(ValueError, match="grad_accum_steps must be a positive int"):
        Trainer(model, TextDataset(train_ids, 16), grad_accum_steps=0)
    with pytest.raises(ValueError, match="there is no val_data"):
        Trainer(model, TextDataset(train_ids, 16), progress=False).evaluate()


def test_bf16_autocast_on_cpu(corpus):
    _, tokenizer, train_ids, _ = corpus
    trainer = Trainer(make_model(tokenizer.vocab_size, dropout=0.0), TextDataset(train_ids, 16), max_steps=3,
                      batch_size=4, mixed_precision="bf16", progress=False)
    row = trainer.train_step()
    assert math.isfinite(row["loss"])
    assert trainer.model.qkv_proj.weight.dtype == torch.float32   # weights stay fp32


# ---- datasets ----------------------------------------------------------------------------------------------
def test_text_dataset_windows_and_bad_input(tmp_path):
    ds = TextDataset(torch.arange(20), block_size=5, stride=2)
    assert len(ds) == (20 - 6) // 2 + 1
    x, y = ds[3]
    assert x.tolist() == [6, 7, 8, 9, 10] and y.tolist() == [7, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="fewer than block_size \\+ 1 = 21"): TextDataset(torch.arange(20), 20)
    with pytest.raises(ValueError, match="does not exist"): read_text_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"): read_text_file(tmp_path / "empty.txt")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"): StreamingTextDataset(tmp_path / "e.txt", 4)


@pytest.mark.parametrize("kind", ["tokens", "text"])
def test_streaming_shards_across_workers_and_ranks(corpus, tmp_path, kind):
    text, tokenizer, _, _ = corpus
    (tmp_path / "a.txt").write_text(text[:9000]); (tmp_path / "b.txt").write_text(text[9000:])
    source = save_token_ids(tokenizer.encode(text), tmp_path / "ids.npy") if kind == "tokens" else [tmp_path / "a.txt", tmp_path / "b.txt"]
    options = dict(tokenizer=tokenizer, chunk_chars=700, stride=8)
    expected = Counter(tuple(x.tolist()) for x, _, _ in StreamingTextDataset(source, 16, **options))
    for world_size, num_workers in [(2, 2), (3, 1)]:
        seen = Counter()
        for rank in range(world_size):
            ds = StreamingTextDataset(source, 16, shuffle_buffer_size=20, seed=5, rank=rank, world_size=world_size, **options)
            for x, _, shard in DataLoader(ds, batch_size=7, num_workers=num_workers):
                assert ((shard // num_workers) == rank).all()
                seen.update(tuple(row.tolist()) for row in x)
        assert seen == expected, (world_size, num_workers)   # every window exactly once


def test_streaming_resume_mid_epoch(corpus, tmp_path):
    text, tokenizer, _, _ = corpus
    (tmp_path / "a.txt").write_text(text)
    make = lambda: StreamingTextDataset(tmp_path / "a.txt", 16, tokenizer=tokenizer, chunk_chars=500, shuffle_buffer_size=10, seed=1)
    full = [x for x, _, _ in DataLoader(make(), batch_size=5, num_workers=2)]
    ds = make()
    for i, (x, _, shard) in enumerate(DataLoader(ds, batch_size=5, num_workers=2)):
        if i == 7: break
        ds.mark_consumed(shard)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(ds.state_dict())))   # the state survives JSON
    rest = [x for x, _, _ in DataLoader(resumed, batch_size=5, num_workers=2)]
    assert len(rest) == len(full) - 7
    assert all(torch.equal(a, b) for a, b in zip(rest, full[7:]))


# ---- optimizer and schedule --------------------------------------------------------------------------------
def test_optimizer_param_groups():
    model = TinyLM(50)
    decay, no_decay = split_decay_parameters(model)
    assert sorted(decay) == ["mlp.0.weight", "mlp.3.weight", "position_embeddings.weight", "qkv_proj.weight", "token_embeddings.weight"]
    assert all(p.ndim == 1 for p in no_decay.values())
    assert "lm_head.weight" not in decay   # tied: optimised once, under its first name
    decay, no_decay = split_decay_parameters(model, decay_embeddings=False)
    assert "token_embeddings.weight" in no_decay and "position_embeddings.weight" in no_decay
    optimizer = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_real_models_param_groups():
    from llm_book.models.gpt import GPT2
    model = GPT2.from_preset("gpt2-tiny")
    decay, no_decay = split_decay_parameters(model)
    assert all(p.ndim == 2 for p in decay.values()) and all(p.ndim == 1 for p in no_decay.values())
    assert any("norm" in name for name in no_decay) and any(name.endswith("bias") for name in no_decay)


def test_scheduler_matches_formula():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = get_scheduler(optimizer, "cosine", warmup_steps=5, max_steps=50, min_lr_ratio=0.1)
    for step in range(60):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine_schedule(step, 5, 50, 0.1))
        optimizer.step(); scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


# ---- checkpoint integrity (issue 10) -----------------------------------------------------------------------
def test_flipped_bytes_in_a_weight_are_detected(corpus, tmp_path):
    run(corpus, tmp_path, stop_at=2)
    path = tmp_path / "checkpoint.safetensors"
    start, end = tensor_byte_range(path, "model.qkv_proj.weight")
    assert end - start >= 1000

    def flip_1000(raw, start, end):
        for i in range(start, start + 1000): raw[i] ^= 0x01   # values stay finite: only a checksum sees it
    damaged = rewrite_checkpoint(path, tmp_path / "flipped.safetensors", byte_change=flip_1000)
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(str(damaged)).values())   # safetensors alone sees nothing wrong
    with pytest.raises(ValueError, match=r"flipped.safetensors' is corrupt: tensor 'model.qkv_proj.weight' does not match the CRC-32 checksum"):
        read_checkpoint(damaged)
    _, tokenizer, _, _ = corpus
    with pytest.raises(ValueError, match="does not match the CRC-32 checksum"):
        load_model_weights(make_model(tokenizer.vocab_size), damaged)
    # an optimizer tensor is checked too
    damaged = rewrite_checkpoint(path, tmp_path / "opt.safetensors", byte_change=flip_1000, name="optimizer.0.exp_avg")
    with pytest.raises(ValueError, match="tensor 'optimizer.0.exp_avg' does not match"):
        read_checkpoint(damaged)


def test_nan_in_a_weight_is_named(corpus, tmp_path):
    import struct
    run(corpus, tmp_path, stop_at=2)
    path = tmp_path / "checkpoint.safetensors"
    def write_nan(raw, start, end): raw[start + 4 : start + 8] = struct.pack("<f", float("nan"))
    damaged = rewrite_checkpoint(path, tmp_path / "nan.safetensors", byte_change=write_nan, name="model.mlp.0.weight")
    with pytest.raises(ValueError, match=r"holds non-finite values: tensor 'model.mlp.0.weight' \(1 NaN, 0 infinite"):
        read_checkpoint(damaged)
    # resuming from it names the tensor instead of training into a NaN loss
    damaged.replace(path)
    with pytest.raises(ValueError, match="tensor 'model.mlp.0.weight'"):
        run(corpus, tmp_path, resume=True)


def test_nan_weights_in_memory_are_named_and_never_saved(corpus, tmp_path):
    trainer = run(corpus, tmp_path, stop_at=4)
    good = (tmp_path / "checkpoint.safetensors").read_bytes()
    with torch.no_grad(): trainer.model.norm.weight[3] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5 because the model's weights are not finite: parameter 'norm.weight' \(1 NaN") as caught:
        trainer.fit()
    assert "last good checkpoint" not in str(caught.value)
    with pytest.raises(ValueError, match="the training state holds non-finite values at step 4: tensor 'model.norm.weight'"):
        trainer.save_checkpoint()
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == good


def test_infinite_gradient_stops_before_the_update(corpus, tmp_path):
    _, tokenizer, train_ids, _ = corpus
    model = make_model(tokenizer.vocab_size)
    trainer = Trainer(model, TextDataset(train_ids, 16), max_steps=4, batch_size=4, progress=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.qkv_proj.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"^the gradient norm is (nan|inf) at step 1 \(loss \d"):
        trainer.train_step()
    assert trainer.step == 0
    for name, p in model.named_parameters(): assert torch.equal(p, before[name]), name


def test_old_checkpoint_without_checksums_loads_with_a_warning(corpus, tmp_path):
    _, tokenizer, _, _ = corpus
    run(corpus, tmp_path, stop_at=2)
    path = tmp_path / "checkpoint.safetensors"
    old = rewrite_checkpoint(path, tmp_path / "old.safetensors", metadata_change=lambda m: {k: v for k, v in m.items() if k != "checksums"})
    with pytest.warns(UserWarning, match="old.safetensors' has no checksums"):
        metadata = load_model_weights(make_model(tokenizer.vocab_size), old)
    assert metadata["step"] == "2"


@pytest.mark.parametrize("change, message", [
    (lambda m: {**m, "step": "9"}, "its metadata does not match the checksum stored at save time"),
    (lambda m: {**m, "checksums": "[1, 2"}, "its metadata key 'checksums' is damaged"),
    (lambda m: {k: v for k, v in m.items() if k not in ("checksums", "rng")}, "the key 'rng' is missing"),
    (lambda m: {**{k: v for k, v in m.items() if k != "checksums"}, "rng": "[]"}, r"has damaged metadata \(IndexError"),
    (lambda m: {**{k: v for k, v in m.items() if k != "checksums"}, "data": "{not json"}, "the key 'data' cannot be read"),
    (lambda m: {**{k: v for k, v in m.items() if k != "checksums"}, "world_size": "two"}, "the key 'world_size' cannot be read"),
    (lambda m: {**{k: v for k, v in m.items() if k != "checksums"}, "aliases": '{"lm_head.weight": "nothing"}'}, "'aliases' names tensors"),
], ids=["metadata-changed", "checksums-damaged", "old-rng-missing", "old-rng-empty", "old-data-not-json", "old-world-size-not-int",
        "old-aliases-dangling"])
def test_damaged_metadata_names_the_file_and_key(corpus, tmp_path, change, message):
    run(corpus, tmp_path / "good", stop_at=2)
    (tmp_path / "bad").mkdir()
    rewrite_checkpoint(tmp_path / "good" / "checkpoint.safetensors", tmp_path / "bad" / "checkpoint.safetensors", metadata_change=change)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # the checkpoints without checksums warn that they cannot be verified
        with pytest.raises(ValueError, match=rf"checkpoint '.*bad/checkpoint.safetensors'.*{message}"):
            run(corpus, tmp_path / "bad", resume=True)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_and_log_follow_the_umask(corpus, tmp_path, umask, mode):
    import os
    previous = os.umask(umask)
    try: run(corpus, tmp_path, stop_at=2)
    finally: os.umask(previous)
    for name in ("checkpoint.safetensors", "log.jsonl"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(mode), name


def test_device_is_checked(corpus):
    _, tokenizer, train_ids, _ = corpus
    data = TextDataset(train_ids, 16)
    with pytest.raises(ValueError, match="device 'tpu' is not a device name; expected 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        Trainer(make_model(tokenizer.vocab_size), data, device="tpu")
    with pytest.raises(ValueError, match="device 'xla' is not supported"):
        Trainer(make_model(tokenizer.vocab_size), data, device="xla")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' needs CUDA, which this machine does not have"):
            Trainer(make_model(tokenizer.vocab_size), data, device="cuda")
    else:
        with pytest.raises(ValueError, match=f"device 'cuda:{torch.cuda.device_count()}' does not exist"):
            Trainer(make_model(tokenizer.vocab_size), data, device=f"cuda:{torch.cuda.device_count()}")


def test_non_finite_optimizer_state_is_never_saved(corpus, tmp_path):
    "`read_checkpoint` refuses non-finite tensors, so `save_checkpoint` must never write one, optimizer state included."
    trainer = run(corpus, tmp_path, stop_at=2)
    good = (tmp_path / "checkpoint.safetensors").read_bytes()
    trainer.optimizer.state[trainer.model.qkv_proj.weight]["exp_avg_sq"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"the training state holds non-finite values at step 2: tensor 'optimizer\.\d+\.exp_avg_sq' \(0 NaN, 1 infinite"):
        trainer.save_checkpoint()
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == good


def test_new_run_refuses_to_overwrite_an_existing_checkpoint(corpus, tmp_path):
    first = run(corpus, tmp_path, max_steps=4)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"out_dir '.*' already holds a run \(checkpoint.safetensors\); "
                                         r"pass resume=True to continue it, or use a new or empty out_dir"):
        run(corpus, tmp_path, max_steps=4)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before   # untouched
    resumed = run(corpus, tmp_path, resume=True, max_steps=4)   # the first way out
    assert resumed.step == first.step == 4
    assert run(corpus, tmp_path / "new", max_steps=2).step == 2   # the second: a new directory
