"""Hugging Face interop (llm_book.hf): configs, name tables, logits parity in both directions, save/load, errors."""
import pytest
import torch
import transformers
from torch import nn

from llm_book.hf import (ARCHITECTURES, HFTokenizer, _hf_model_class, check_state_dict, config_from_hf, config_to_hf,
                         from_hf, load_state_dict_strict, logits_max_diff, save_hf, state_dict_from_hf,
                         state_dict_to_hf, to_hf)

transformers.utils.logging.disable_progress_bar()
ARCHS = list(ARCHITECTURES)
TOL = 1e-5


def random_model(arch, seed=0, **overrides):
    "A tiny llm_book model with every parameter random (norm weights around 1)."
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch][0].from_preset(f"{arch}-tiny", **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def random_hf_model(arch, seed=0, **overrides):
    "A tiny 🤗 model with its own random init (norm weights perturbed too)."
    config = config_to_hf(ARCHITECTURES[arch][0].from_preset(f"{arch}-tiny", **overrides).config)
    torch.manual_seed(seed)
    hf_model = _hf_model_class(arch)(config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.ndim == 1: p.add_(torch.randn_like(p) * 0.05)
    return hf_model


def batch(seq_len=20, padded=True):
    "Random ids (2, T) and a mask whose second row is left-padded by 4 (or no padding)."
    torch.manual_seed(1)
    input_ids = torch.randint(0, 128, (2, seq_len))
    mask = torch.ones(2, seq_len, dtype=torch.bool)
    if padded: mask[1, :4] = False
    return input_ids, mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_ours_to_hf_logits(arch, padded):
    model = random_model(arch)
    input_ids, mask = batch(20, padded)   # T=20 > mistral-tiny's window of 8
    assert logits_max_diff(model, to_hf(model), input_ids, mask) < TOL


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_hf_to_ours_logits(arch, padded):
    hf_model = random_hf_model(arch)
    input_ids, mask = batch(20, padded)
    assert logits_max_diff(from_hf(hf_model), hf_model, input_ids, mask) < TOL


def test_parity_check_can_fail():
    "A slightly wrong weight is caught: the tolerance is meaningful."
    model = random_model("llama")
    hf_model = to_hf(model)
    with torch.no_grad(): hf_model.model.layers[1].self_attn.k_proj.weight[0, 0] += 0.5
    assert logits_max_diff(model, hf_model, *batch()) > 1e-3


def test_mistral_window_matters():
    "Sequences longer than the window: a Llama with the same weights (no window) gives different logits."
    model = random_model("mistral")
    input_ids, _ = batch(24, padded=False)
    hf_model = to_hf(model)
    assert hf_model.config.sliding_window == 8
    hf_llama = transformers.LlamaForCausalLM(config_to_hf(dict(model.config, architecture="llama", window_size=None)))
    hf_llama.load_state_dict(hf_model.state_dict())
    assert logits_max_diff(model, hf_model, input_ids) < TOL
    assert logits_max_diff(model, hf_llama.eval(), input_ids) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_identical(arch):
    model = random_model(arch)
    hf_model = to_hf(model)
    prompt = batch(6, padded=False)[0][:1]
    ours = model.generate(prompt, max_new_tokens=20)
    theirs = hf_model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(ours, theirs)


def test_llama_features_round_trip():
    "Tied embeddings, GQA, RoPE base, norm eps and bias survive both conversions."
    model = random_model("llama", tie_word_embeddings=True, rope_base=500.0, norm_eps=1e-6, num_kv_heads=1, bias=True)
    hf_model = to_hf(model)
    c = hf_model.config
    assert (c.tie_word_embeddings, c.num_key_value_heads, c.rope_parameters["rope_theta"], c.rms_norm_eps,
            c.attention_bias, c.mlp_bias) == (True, 1, 500.0, 1e-6, True, True)
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    assert logits_max_diff(model, hf_model, *batch()) < TOL
    back = from_hf(hf_model)
    assert back.lm_head.weight is back.token_embeddings.weight
    assert back.config == dict(model.config)


def test_save_hf_loads_with_auto_model(tmp_path):
    for arch in ARCHS:
        model = random_model(arch)
        path = save_hf(model, tmp_path / arch)
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        assert type(hf_model) is _hf_model_class(arch)
        assert logits_max_diff(model, hf_model, *batch()) < TOL
        back = from_hf(path)
        assert type(back) is type(model)
        torch.testing.assert_close(back(batch()[0]), model(batch()[0]), rtol=0, atol=1e-6)


def test_config_round_trip():
    for arch in ARCHS:
        config = ARCHITECTURES[arch][0].from_preset(f"{arch}-tiny").config
        assert config_from_hf(config_to_hf(config)) == config
    gpt2 = config_from_hf(transformers.GPT2Config())
    assert (gpt2["embed_dim"], gpt2["hidden_dim"], gpt2["norm_eps"], gpt2["tie_word_embeddings"]) == (768, 3072, 1e-5, True)
    with pytest.raises(ValueError, match="model_type 'bert'"): config_from_hf(transformers.BertConfig())
    with pytest.raises(ValueError, match="hidden_act is 'gelu'"): config_from_hf(transformers.LlamaConfig(hidden_act="gelu"))


def test_state_dict_names_match_contract():
    "Converting a real 🤗 state dict gives exactly our model's names and shapes, and back gives 🤗's."
    for arch in ARCHS:
        hf_model = random_hf_model(arch)
        config = config_from_hf(hf_model.config)
        ours = state_dict_from_hf(hf_model.state_dict(), config)
        expected = ARCHITECTURES[arch][0](config).state_dict()
        assert {n: tuple(t.shape) for n, t in ours.items()} == {n: tuple(t.shape) for n, t in expected.items()}
        back = state_dict_to_hf(ours, config, hf_model.state_dict())
        assert all(torch.equal(back[n], t) for n, t in hf_model.state_dict().items())


def test_missing_unexpected_misshaped_are_errors():
    hf_model = random_hf_model("llama")
    config = config_from_hf(hf_model.config)
    state = dict(hf_model.state_dict())
    del state["model.layers.1.self_attn.v_proj.weight"]
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \(1\): model.layers.1.self_attn.v_proj.weight; "
                                         r"unexpected \(1\): model.layers.9.mlp.up_proj.weight"):
        state_dict_from_hf(state, config)
    ours = state_dict_from_hf(hf_model.state_dict(), config)
    ours["final_norm.weight"] = torch.ones(31)
    model = random_model("llama")
    before = model.final_norm.weight.clone()
    with pytest.raises(ValueError, match=r"mis-shaped \(1\): final_norm.weight: got \(31,\), expected \(32,\)"):
        load_state_dict_strict(model, ours)
    assert torch.equal(model.final_norm.weight, before)   # nothing was loaded
    with pytest.raises(ValueError, match=r"missing \(1\): b; unexpected \(1\): c"):
        check_state_dict({"a": torch.zeros(1), "c": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)})


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="not a directory with a config.json"): from_hf(tmp_path)
    with pytest.raises(ValueError, match="expected a Transformers model or a directory"): from_hf(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="expected one of GPT2, Llama, Mistral"): to_hf(nn.Linear(2, 2))


def test_hf_tokenizer_adapter(tmp_path):
    from llm_book.gguf import smollm2_path
    path = smollm2_path()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = HFTokenizer(hf_tokenizer)
    text = "Héllo wörld 🤗 <|im_end|>"
    ids = tokenizer.encode(text, allowed_special="all")
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text)[-1] != tokenizer.special_tokens["<|im_end|>"]   # not allowed: plain text
    assert tokenizer.decode(ids) == text and tokenizer.vocab_size == 49152
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages) == tokenizer.encode(
        hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), allowed_special="all")
    reloaded = HFTokenizer.load(tokenizer.save(tmp_path / "tokenizer.json"))
    assert reloaded.encode(text, allowed_special="all") == ids
