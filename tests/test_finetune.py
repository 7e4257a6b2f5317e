"""Fine-tuning: LoRA adapters (identity at start, merge, save/load with the base model's identity), SFT data and masks."""
import json

import pytest
import torch

from llm_book.finetune.lora import (LoRALinear, add_lora, base_state_dict, load_lora, lora_layers, merge_lora,
                                    save_lora)
from llm_book.models.gpt import GPT2
from llm_book.models.llama import Llama
from llm_book.training.optimizer import configure_optimizer


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return Llama.from_preset("llama-tiny", **overrides).eval()


def randomize_adapters(model, std=0.1):
    with torch.no_grad():
        for layer in lora_layers(model).values(): layer.lora_B.normal_(std=std)


@pytest.mark.parametrize("make", [tiny_llama, lambda: GPT2.from_preset("gpt2-tiny").eval()], ids=["llama", "gpt2"])
def test_lora_starts_as_the_base_model_and_merges_to_the_same_logits(make):
    model = make()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad(): before = model(ids)
    names = add_lora(model, targets=[r"(qkv|c_attn|out|c_proj)", r"proj$"], rank=4, alpha=8)
    assert names and all(isinstance(m, LoRALinear) for m in lora_layers(model).values())
    with torch.no_grad(): assert torch.equal(model(ids), before)         # B = 0: identical
    randomize_adapters(model)
    with torch.no_grad(): adapted = model(ids)
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert lora_layers(model) == {}
    with torch.no_grad(): torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=0)


def test_only_the_adapters_train():
    model = tiny_llama()
    add_lora(model, rank=2)
    optimizer = configure_optimizer(model, lr=1e-2)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    model(torch.randint(0, 128, (2, 8))).sum().backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == \
        sum(l.lora_A.numel() + l.lora_B.numel() for l in lora_layers(model).values())


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets=["q_proj"]), "target 'q_proj' matches no linear layer"),
    (dict(rank=0), "rank must be a positive int, got 0"),
    (dict(rank=-3), "rank must be a positive int, got -3"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(targets=["("]), "not a valid regular expression"),
])
def test_add_lora_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")): add_lora(tiny_llama(), **kwargs)


def test_add_lora_refuses_a_tied_head_and_a_second_round():
    with pytest.raises(ValueError, match="tied embeddings"):
        add_lora(tiny_llama(tie_word_embeddings=True), targets="lm_head")
    model = tiny_llama()
    add_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"): add_lora(model, rank=2)


def test_adapter_saves_alone_and_loads_onto_its_base_model(tmp_path):
    model = tiny_llama()
    add_lora(model, targets=["qkv_proj$", "down_proj$"], rank=3, alpha=6)
    randomize_adapters(model)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad(): tuned = model(ids)
    path = save_lora(model, tmp_path / "adapter.safetensors")
    base_bytes = sum(t.numel() * t.element_size() for t in base_state_dict(model).values())
    assert path.stat().st_size < base_bytes / 2                           # the adapter, not the model
    fresh = tiny_llama()                                                  # the same seed: the same base weights
    names = load_lora(fresh, path)
    assert names == list(lora_layers(model))
    with torch.no_grad(): torch.testing.assert_close(fresh(ids), tuned, atol=1e-6, rtol=0)


def test_adapter_for_another_model_is_refused(tmp_path):
    model = tiny_llama()
    add_lora(model, rank=2)
    path = save_lora(model, tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match="saved for another model.*fingerprint"): load_lora(tiny_llama(seed=1), path)
    with pytest.raises(ValueError, match=r"saved for another model.*\['num_layers'\]"): load_lora(tiny_llama(num_layers=3), path)
    with pytest.raises(ValueError, match="does not exist"): load_lora(tiny_llama(), tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="truncated or corrupt"): load_lora(tiny_llama(), tmp_path / "junk.safetensors")


def test_save_and_merge_need_adapters(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters to save"): save_lora(tiny_llama(), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="no LoRA adapters to merge"): merge_lora(tiny_llama())


# ---- SFT -------------------------------------------------------------------------------------------------------------
from llm_book.finetune.sft import SFTDataset, check_chat, read_chats, tokenize_chat
from llm_book.training.trainer import IGNORE_INDEX, Trainer, compute_loss


@pytest.fixture(scope="module")
def tokenizer():
    from llm_book.gguf import smollm2_path
    from llm_book.tokenizers.bpe_tokenizer import BPETokenizer
    return BPETokenizer.from_gguf(smollm2_path())


def qa(question, answer): return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

CHATS = [qa(f"What is {a} + {b}? Answer with the number only.", str(a + b)) for a, b in [(1, 2), (3, 4), (10, 7), (8, 8), (2, 9), (5, 0)]]


def test_only_assistant_tokens_are_targets(tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, *qa("Hi", "Hello."), *qa("Bye", "Bye!")]
    ids, is_assistant = tokenize_chat(tokenizer, chat)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    assert tokenizer.decode([t for t, a in zip(ids, is_assistant) if a]) == "Hello.<|im_end|>\nBye!<|im_end|>\n"
    data = SFTDataset([chat], tokenizer, max_length=64)
    inputs, targets = data[0]
    learned = [int(t) for t in targets if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Hello.<|im_end|>\nBye!<|im_end|>\n" and data.assistant_tokens == len(learned)
    assert inputs.tolist() == ids[:-1]


def test_masked_positions_get_exactly_zero_gradient(tokenizer):
    torch.manual_seed(0)
    model = Llama.from_preset("llama-tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    data = SFTDataset(CHATS[:2] + [[{"role": "system", "content": "Be brief."}, *qa("Hi", "Hello there.")]], tokenizer, 128)
    inputs, targets = data.get_batch([0, 1, 2])
    kept = {}
    def keep(module, args, output): output.retain_grad(); kept["logits"] = output
    model.register_forward_hook(keep)
    compute_loss(model, inputs, targets).backward()
    grad = kept["logits"].grad.abs().sum(-1)                           # (B, T)
    masked = targets == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    assert grad[masked].max().item() == 0.0
    assert (grad[~masked] > 0).all()


@pytest.mark.parametrize("line, message", [
    ({"prompt": "hi", "answer": "yo"}, "line 2: expected an object with a 'messages' list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "line 2: message 1 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: has no assistant turn"),
    ({"messages": [{"role": "user", "text": "hi"}]}, "line 2: message 0 must be an object with 'role' and 'content'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "line 2: message 0 has role 'robot'"),
    ({"messages": []}, "line 2: 'messages' must be a non-empty list"),
    ("not json", "line 2: not valid JSON"),
])
def test_bad_chat_lines_are_named(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(ValueError, match=f"data.jsonl {message}".replace("(", r"\(")): read_chats(path)


def test_a_chat_longer_than_the_context_is_an_error_naming_it(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in [CHATS[0], qa("word " * 200, "ok")]) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl line 2: the chat is \d+ tokens, longer than the context of 129"):
        SFTDataset.from_jsonl(path, tokenizer, max_length=128)
    assert len(SFTDataset.from_jsonl(path, tokenizer, max_length=512)) == 2


def test_validation_loss_is_a_mean_over_the_assistant_tokens(tokenizer):
    torch.manual_seed(0)
    model = Llama.from_preset("llama-tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    data = SFTDataset(CHATS, tokenizer, 128)
    trainer = Trainer(model, data, val_data=data, batch_size=2, eval_batches=10, progress=False, device="cpu", mixed_precision="no")
    inputs, targets = data.get_batch(range(len(data)))
    with torch.no_grad():
        logits = model(inputs)
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert trainer.evaluate()["loss"] == pytest.approx(expected.item(), rel=1e-5)


def make_sft_trainer(tokenizer, out_dir, resume=False):
    torch.manual_seed(0)
    model = Llama.from_preset("llama-tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=128, dropout=0.1)
    add_lora(model, rank=2)
    data = SFTDataset(CHATS, tokenizer, 128)
    return Trainer(model, data, max_steps=6, batch_size=2, lr=1e-2, warmup_steps=2, checkpoint_interval=3, log_interval=1,
                   progress=False, device="cpu", mixed_precision="no", out_dir=out_dir, resume=resume)


def test_an_interrupted_lora_fine_tune_resumes_exactly(tmp_path, tokenizer):
    straight = make_sft_trainer(tokenizer, tmp_path / "straight")
    straight.fit()
    interrupted = make_sft_trainer(tokenizer, tmp_path / "interrupted")
    interrupted.fit(max_steps=3)                                          # stops after the step-3 checkpoint
    resumed = make_sft_trainer(tokenizer, tmp_path / "interrupted", resume=True)
    assert resumed.step == 3
    resumed.fit()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]


# ---- export ----------------------------------------------------------------------------------------------------------
from llm_book.finetune.export import gguf_tensors, permute_qk, save_gguf
from llm_book.gguf import load_gguf, unpermute_qk


def tuned_tiny_llama(tokenizer):
    "A tiny LLaMA with SmolLM2's vocabulary and a merged (random) LoRA update."
    model = tiny_llama(vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    add_lora(model, rank=2)
    randomize_adapters(model)
    return merge_lora(model).eval()


def test_permute_qk_inverts_unpermute_qk():
    w = torch.randn(2 * 6, 4)
    assert torch.equal(unpermute_qk(permute_qk(w, 2), 2), w) and torch.equal(permute_qk(unpermute_qk(w, 2), 2), w)


def test_gguf_round_trip_gives_identical_logits(tmp_path, tokenizer):
    model = tuned_tiny_llama(tokenizer)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "What is 4 + 4?"}])])
    back, back_tokenizer = load_gguf(save_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32"))
    with torch.no_grad(): assert torch.equal(back(ids), model(ids))
    assert back_tokenizer.chat_template == tokenizer.chat_template
    assert back_tokenizer.encode("Hello, world! 123") == tokenizer.encode("Hello, world! 123")
    half, _ = load_gguf(save_gguf(model, tokenizer, tmp_path / "h.gguf", dtype="f16"))
    with torch.no_grad(): torch.testing.assert_close(half(ids), model(ids), atol=1e-2, rtol=0)   # f16 rounding


def test_gguf_writer_bad_input(tmp_path, tokenizer):
    model = tiny_llama(vocab_size=tokenizer.vocab_size)
    with pytest.raises(ValueError, match="dtype is 'q4'"): save_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="q4")
    add_lora(model, rank=2)
    with pytest.raises(ValueError, match="still has LoRA adapters; call merge_lora"): gguf_tensors(model)
    with pytest.raises(ValueError, match="tokenizer has 49152 tokens but the model's vocab_size is 128"):
        save_gguf(tiny_llama(), tokenizer, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="architecture 'llama'"): gguf_tensors(GPT2.from_preset("gpt2-tiny"))
    assert not (tmp_path / "m.gguf").exists()


def test_merged_model_exports_to_transformers_within_1e_4(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from llm_book.hf import save_hf
    model = tuned_tiny_llama(tokenizer)
    save_hf(model, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 16))
    with torch.no_grad(): torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_exported_smollm2_decodes_the_same_greedy_tokens_in_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `bench` extra) is not installed; llama.cpp check skipped")
    model, tokenizer = load_gguf()
    path = save_gguf(model, tokenizer, tmp_path / "smollm2-f16.gguf", dtype="f16")
    ours, _ = load_gguf(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad(): expected = ours.generate(torch.tensor([prompt]), max_new_tokens=8)[0, len(prompt):].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    got = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(expected): break
    assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))


# ---- CLI -------------------------------------------------------------------------------------------------------------
from llm_book.cli import main as cli_main
from llm_book.finetune.cli import load_finetuned


@pytest.fixture
def tiny_gguf_and_data(tmp_path, tokenizer):
    model = tiny_llama(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    gguf_path = save_gguf(model, tokenizer, tmp_path / "tiny.gguf", dtype="f32")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    return gguf_path, data


def test_cli_finetune_resume_and_export(tmp_path, tiny_gguf_and_data, capsys):
    gguf_path, data = tiny_gguf_and_data
    common = ["--data", str(data), "--model", str(gguf_path), "--lora-rank", "2", "--batch-size", "2", "--device", "cpu",
              "--no-progress", "--checkpoint-interval", "2", "--warmup-steps", "0"]
    assert cli_main(["finetune", *common, "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert (tmp_path / "straight" / "adapter.safetensors").is_file()
    assert cli_main(["finetune", *common, "--steps", "4", "--minutes", "1e-9", "--out", str(tmp_path / "cut")]) == 0   # stops after 1 step
    assert cli_main(["finetune", *common, "--steps", "4", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    straight, tokenizer = load_finetuned(tmp_path / "straight")
    resumed, _ = load_finetuned(tmp_path / "cut")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()): assert torch.equal(a, b), name
    assert cli_main(["export", "--run", str(tmp_path / "straight"), "--to", "gguf", "--dtype", "f32", "--out", str(tmp_path / "t.gguf")]) == 0
    exported, _ = load_gguf(tmp_path / "t.gguf")
    ids = torch.randint(0, tokenizer.vocab_size, (1, 10))
    with torch.no_grad(): assert torch.equal(exported(ids), straight(ids))
    capsys.readouterr()
    assert cli_main(["finetune", *common, "--steps", "4", "--out", str(tmp_path / "straight")]) == 2
    assert "already holds a fine-tune" in capsys.readouterr().err


def test_cli_finetune_bad_input(tmp_path, tiny_gguf_and_data, capsys):
    gguf_path, data = tiny_gguf_and_data
    base = ["finetune", "--model", str(gguf_path), "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]
    assert cli_main([*base, "--data", str(data), "--lora-rank", "-1"]) == 2
    assert "rank must be a positive int, got -1" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + json.dumps({"text": "hi"}) + "\n")
    assert cli_main([*base, "--data", str(bad)]) == 2
    assert "bad.jsonl line 2: expected an object with a 'messages' list" in capsys.readouterr().err
    assert cli_main(["export", "--run", str(tmp_path / "nothing"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "has no finetune.json" in capsys.readouterr().err


# ---- DPO -------------------------------------------------------------------------------------------------------------
import math

from llm_book.finetune.dpo import dpo_loss, sequence_logprobs


def test_dpo_loss_matches_a_hand_computation():
    # log-ratios: chosen (-2) - (-3) = +1, rejected (-6) - (-5) = -1; margin 0.5 * 2 = 1; loss log(1 + e^-1)
    loss, stats = dpo_loss(torch.tensor([-2.0, -1.0]), torch.tensor([-6.0, -1.0]), torch.tensor([-3.0, -1.0]),
                           torch.tensor([-5.0, -3.0]), beta=0.5)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2     # second row: margin 0.5 * (0 - 2) = -1
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats == {"reward_margin": 0.0, "preference_accuracy": 0.5}
    with pytest.raises(ValueError, match="beta must be > 0"): dpo_loss(*[torch.zeros(1)] * 4, beta=-1)


def test_sequence_logprobs_sum_only_the_reply():
    model = tiny_llama()
    inputs = torch.randint(0, 128, (2, 6))
    targets = torch.full((2, 6), IGNORE_INDEX)
    targets[:, 3:] = torch.randint(0, 128, (2, 3))
    with torch.no_grad():
        logp = model(inputs).log_softmax(-1)
        expected = sum(logp[:, t].gather(-1, targets[:, t, None])[:, 0] for t in range(3, 6))
        torch.testing.assert_close(sequence_logprobs(model, inputs, targets), expected)
