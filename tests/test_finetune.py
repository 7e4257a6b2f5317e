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
