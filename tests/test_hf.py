"""Hugging Face interop (llm_book.hf): configs, name tables, logits parity in both directions, save/load, errors."""
import json
import os
import re
import stat

import pytest
import torch
import transformers
from torch import nn

from llm_book.core.gelu import GELU

from llm_book.training.checkpoint import check_state_dict
from llm_book.hf import (ARCHITECTURES, _hf_model_class, config_from_hf, config_to_hf, from_hf, load_state_dict_strict,
                         logits_max_diff, save_hf, state_dict_from_hf, state_dict_to_hf, to_hf)
from llm_book.tokenizers.hf_tokenizer import HFTokenizer

transformers.utils.logging.disable_progress_bar()
ARCHS = ["gpt2", "llama", "mistral"]   # the original GPT has its own tests below (its GELU)
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
    with pytest.raises(ValueError, match="hidden_act='gelu'"): config_from_hf(transformers.LlamaConfig(hidden_act="gelu"))


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
    with pytest.raises(ValueError, match="expected one of GPT, GPT2, Llama, Mistral"): to_hf(nn.Linear(2, 2))


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


# ---- 🤗 config settings that change the math: each is mapped (parity) or refused by name ----

HF_BASE = {  # tiny Transformers configs with 3 layers (so a per-layer setting shows from layer 2 on)
    "gpt2": dict(vocab_size=128, n_embd=32, n_head=4, n_layer=3, n_positions=64, bos_token_id=None, eos_token_id=None),
    "llama": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None),
    "mistral": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, sliding_window=8, bos_token_id=None, eos_token_id=None),
}
HF_CONFIG_CLASS = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}


def hf_model_with(arch, seed=0, scale=0.2, **fields):
    "A tiny 🤗 model built straight from a Transformers config with `fields`; every weight perturbed by N(0, scale²)."
    hf_model = _hf_model_class(arch)(HF_CONFIG_CLASS[arch](**(HF_BASE[arch] | fields)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in hf_model.parameters(): p.add_(torch.randn_like(p) * scale)   # norms around 1, biases around 0
    return hf_model.eval()


SUPPORTED = [  # (arch, 🤗 fields, with the same weights, do they change 🤗's logits?)
    ("gpt2", dict(n_inner=48), False),
    ("gpt2", dict(layer_norm_epsilon=0.3), True),
    ("gpt2", dict(tie_word_embeddings=False), False),
    ("gpt2", dict(n_positions=32), False),
    ("gpt2", dict(reorder_and_upcast_attn=True), False),          # float32 scores with the scale folded in: same function
    ("gpt2", dict(activation_function="gelu_pytorch_tanh"), False),
    ("gpt2", dict(activation_function="gelu_python_tanh"), False),
    ("gpt2", dict(activation_function="gelu_fast"), False),
    ("gpt2", dict(resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2), False),
    ("llama", dict(head_dim=16), False),
    ("llama", dict(rope_theta=500.0), True),                     # the pre-Transformers-5 spelling
    ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=500.0)), True),
    ("llama", dict(rms_norm_eps=0.3), True),
    ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=16)), True),   # chapter 13
    ("llama", dict(attention_bias=True, mlp_bias=True), False),
    ("llama", dict(tie_word_embeddings=True), False),
    ("llama", dict(num_key_value_heads=1), False),
    ("llama", dict(pretraining_tp=2), False),                     # Transformers 5 ignores it; older ones split the same sums
    ("llama", dict(hidden_act="swish"), False),                   # another name for SiLU
    ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=1.0)), False),
    ("mistral", dict(sliding_window=4), True),
    ("mistral", dict(sliding_window=None), True),
    ("mistral", dict(head_dim=16, rope_theta=500.0), False),
    ("mistral", dict(use_sliding_window=True), False),
    ("mistral", dict(attention_bias=True), False),                # Transformers' Mistral has no biases whatever this says
]


@pytest.mark.parametrize("arch, fields, changes_logits", SUPPORTED, ids=lambda v: repr(v) if isinstance(v, dict) else str(v))
def test_supported_hf_settings_give_the_same_logits(arch, fields, changes_logits):
    hf_model = hf_model_with(arch, **fields)
    ours = from_hf(hf_model)
    input_ids, mask = batch(20, padded=True)
    assert logits_max_diff(ours, hf_model, input_ids, mask) < TOL
    if changes_logits:   # the setting matters: had the conversion ignored it, the line above would have failed
        assert logits_max_diff(ours, hf_model_with(arch), input_ids, mask) > 1e-2
    back = to_hf(ours)    # and back: a 🤗 model computing the same function
    assert logits_max_diff(ours, back, input_ids, mask) < TOL


REFUSED = [  # (arch, 🤗 fields, what the error must name)
    ("gpt2", dict(scale_attn_weights=False), "scale_attn_weights=False"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True), "scale_attn_by_inverse_layer_idx=True"),
    ("gpt2", dict(activation_function="gelu"), "activation_function='gelu'"),
    ("gpt2", dict(activation_function="relu"), "activation_function='relu'"),
    ("gpt2", dict(add_cross_attention=True), "add_cross_attention=True"),
    ("gpt2", dict(embd_pdrop=0.1, attn_pdrop=0.0, resid_pdrop=0.1), "embd_pdrop/attn_pdrop/resid_pdrop=(0.1, 0.0, 0.1)"),
    ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0)), "rope_parameters['rope_type']='linear'"),
    ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)), "rope_type']='dynamic'"),
    ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
     "partial_rotary_factor=0.5"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("llama", dict(attention_bias=True), "attention_bias/mlp_bias=(True, False)"),
    ("llama", dict(mlp_bias=True), "attention_bias/mlp_bias=(False, True)"),
    ("llama", dict(sliding_window=4), "sliding_window=4"),
    ("mistral", dict(use_sliding_window=False), "use_sliding_window=False"),
    ("mistral", dict(layer_types=["full_attention", "sliding_attention", "sliding_attention"]), "layer_types=["),
    ("mistral", dict(hidden_act="relu"), "hidden_act='relu'"),
    ("mistral", dict(rope_scaling=dict(rope_type="yarn", factor=2.0)), "rope_type']='yarn'"),
]


@pytest.mark.parametrize("arch, fields, named", REFUSED, ids=lambda v: repr(v) if isinstance(v, dict) else str(v))
def test_unsupported_hf_settings_are_refused_by_name(arch, fields, named, tmp_path):
    hf_model = hf_model_with(arch, **fields)
    with pytest.raises(ValueError, match=re.escape(named)): config_from_hf(hf_model.config)
    with pytest.raises(ValueError, match=re.escape(named)): from_hf(hf_model)
    hf_model.save_pretrained(tmp_path)                                  # and from a directory
    if "layer_types" in fields: named = "model_type 'ministral'"        # which Transformers reads as a Ministral
    with pytest.raises(ValueError, match=re.escape(named)): from_hf(tmp_path)


def test_issue_gpt2_settings_change_the_logits_and_every_problem_is_named():
    "The two GPT-2 settings of the issue do change the logits (so loading them was silently wrong), and both are named."
    input_ids, mask = batch(20)
    default = hf_model_with("gpt2")
    for fields in [dict(scale_attn_weights=False), dict(scale_attn_by_inverse_layer_idx=True)]:
        with torch.no_grad():
            theirs = hf_model_with("gpt2", **fields)(input_ids, attention_mask=mask.long()).logits
            assert (theirs - default(input_ids, attention_mask=mask.long()).logits)[mask].abs().max() > 1e-2
    both = transformers.GPT2Config(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match=r"scale_attn_weights=False .*; scale_attn_by_inverse_layer_idx=True"):
        config_from_hf(both)


def test_config_to_hf_refuses_what_transformers_cannot_express():
    gpt2 = dict(ARCHITECTURES["gpt2"][0].from_preset("gpt2-tiny").config)
    for change, named in [(dict(bias=False), "bias=False"), (dict(num_kv_heads=2), "num_kv_heads=2"),
                          (dict(window_size=8), "window_size=8"), (dict(head_dim=16), "head_dim=16")]:
        with pytest.raises(ValueError, match=re.escape(named)): config_to_hf(gpt2 | change)
    mistral = dict(ARCHITECTURES["mistral"][0].from_preset("mistral-tiny").config)
    with pytest.raises(ValueError, match=re.escape("bias=True (Transformers' Mistral has no biases)")):
        config_to_hf(mistral | dict(bias=True))
    with pytest.raises(ValueError, match=re.escape("bias=True")): to_hf(random_model("mistral", bias=True))


def test_config_overrides_may_add_metadata_but_not_change_the_math():
    model = random_model("gpt2")
    assert to_hf(model, eos_token_id=3, pad_token_id=0).config.eos_token_id == 3
    with pytest.raises(ValueError, match=re.escape("scale_attn_weights=False")): to_hf(model, scale_attn_weights=False)
    with pytest.raises(ValueError, match=re.escape("change ['norm_eps']")): to_hf(model, layer_norm_epsilon=0.5)
    with pytest.raises(ValueError, match=re.escape("attn_pdrop")): config_to_hf(model.config, attn_pdrop=0.3)
    llama = random_model("llama")
    with pytest.raises(ValueError, match=re.escape("change ['rope_base']")):
        to_hf(llama, rope_parameters=dict(rope_type="default", rope_theta=5.0))
    with pytest.raises(ValueError, match=re.escape("rope_type']='linear'")):
        to_hf(llama, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))


# ---- directories: the weights must fit config.json exactly ----

def edit_config_json(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("arch, layers_key", [("gpt2", "n_layer"), ("llama", "num_hidden_layers"), ("mistral", "num_hidden_layers")])
def test_directory_whose_config_has_more_layers_than_its_weights(arch, layers_key, tmp_path):
    "The issue's case: config.json says 3 layers, the weights hold 2 (Transformers would fill layer 3 randomly)."
    path = save_hf(random_model(arch), tmp_path / arch)
    edit_config_json(path, **{layers_key: 3})
    layer_2 = "transformer.h.2." if arch == "gpt2" else "model.layers.2."
    with pytest.raises(ValueError, match=rf"weights in '{re.escape(str(path))}' do not fit its config.json; "
                                         rf"missing \(\d+\): {re.escape(layer_2)}"):
        from_hf(path)
    edit_config_json(path, **{layers_key: 1})      # fewer layers than the weights: the extra ones are named too
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): " + re.escape(layer_2.replace("2", "1"))):
        from_hf(path)


def test_directory_missing_or_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    path = save_hf(random_model("llama"), tmp_path / "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("missing (1): model.layers.1.self_attn.v_proj.weight; "
                                                   "mis-shaped (1): model.norm.weight: got (31,), expected (32,)")):
        from_hf(path)


def test_directory_that_transformers_cannot_read_is_named(tmp_path):
    path = save_hf(random_model("gpt2"), tmp_path / "gpt2")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=re.escape(f"hf_model_or_dir {str(path)!r} cannot be loaded by Transformers")):
        from_hf(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"hf_model_or_dir {str(path)!r} cannot be loaded by Transformers")):
        from_hf(path)


# ---- save_hf writes with the user's umask ----

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_save_hf_files_get_the_users_umask(umask, mode, tmp_path):
    old = os.umask(umask)
    try: path = save_hf(random_model("llama"), tmp_path / "out")
    finally: os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes == {name: mode for name in ("config.json", "generation_config.json", "model.safetensors")}


# ---- the original GPT <-> transformers.OpenAIGPTLMHeadModel ----

def with_gelu(model, approximate):
    "`model` with every GELU computing `approximate` ('tanh' is what Transformers' OpenAI GPT computes)."
    for module in model.modules():
        if isinstance(module, GELU): module.approximate = approximate
    return model


def random_hf_gpt(seed=0, **fields):
    "A tiny 🤗 OpenAI GPT with every weight perturbed."
    config = transformers.OpenAIGPTConfig(**(dict(vocab_size=128, n_embd=32, n_head=4, n_layer=3, n_positions=64) | fields))
    torch.manual_seed(seed)
    hf_model = transformers.OpenAIGPTLMHeadModel(config)
    with torch.no_grad():
        for p in hf_model.parameters(): p.add_(torch.randn_like(p) * 0.2)
    return hf_model.eval()


@pytest.mark.parametrize("padded", [False, True])
def test_gpt_to_openai_gpt_and_back(padded, tmp_path):
    model = random_model("gpt")   # the tanh GELU, as OpenAI's GPT
    input_ids, mask = batch(20, padded)
    hf_model = to_hf(model)
    assert type(hf_model) is transformers.OpenAIGPTLMHeadModel
    assert hf_model.lm_head.weight.data_ptr() == hf_model.transformer.tokens_embed.weight.data_ptr()
    assert logits_max_diff(model, hf_model, input_ids, mask) < TOL
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(save_hf(model, tmp_path / "gpt"), local_files_only=True)
    assert logits_max_diff(model, reloaded.eval(), input_ids, mask) < TOL
    # 🤗 (its own weights, untied head) -> ours, through the same config and name tables from_hf uses
    hf_model = random_hf_gpt(tie_word_embeddings=False, layer_norm_epsilon=0.3)
    config = config_from_hf(hf_model.config)
    assert (config["architecture"], config["hidden_dim"], config["norm_eps"], config["tie_word_embeddings"]) == ("gpt", 128, 0.3, False)
    ours = ARCHITECTURES["gpt"][0](config)
    load_state_dict_strict(ours, state_dict_from_hf(hf_model.state_dict(), config)).eval()
    assert logits_max_diff(ours, hf_model, input_ids, mask) < TOL
    assert logits_max_diff(with_gelu(ours, "none"), hf_model, input_ids, mask) > 1e-4   # the GELU matters


def test_gpt_with_another_gelu_than_openai_gpt_is_refused():
    "Transformers' OpenAI GPT computes the tanh GELU: a GPT computing the exact one is refused, not converted approximately."
    with pytest.raises(ValueError, match=re.escape("GELU(approximate='none')")): to_hf(with_gelu(random_model("gpt"), "none"))


@pytest.mark.parametrize("padded", [False, True])
def test_gpt_computes_the_tanh_gelu_and_from_hf_converts_openai_gpt_exactly(padded):
    "llm_book's GPT computes the tanh GELU of OpenAI's code, so 🤗's OpenAI GPT converts with equal logits."
    gelus = {m.approximate for m in ARCHITECTURES["gpt"][0].from_preset("gpt-tiny").modules() if isinstance(m, GELU)}
    assert gelus == {"tanh"}
    hf_model = random_hf_gpt()
    ours = from_hf(hf_model)
    assert type(ours).__name__ == "GPT"
    assert logits_max_diff(ours, hf_model, *batch(20, padded)) < TOL
    assert logits_max_diff(ours, to_hf(ours), *batch(20, padded)) < TOL


def test_gpt_settings_transformers_cannot_express_are_refused():
    with pytest.raises(ValueError, match=re.escape("afn='relu'")): config_from_hf(transformers.OpenAIGPTConfig(afn="relu"))
    with pytest.raises(ValueError, match=re.escape("embd_pdrop/attn_pdrop/resid_pdrop=(0.1, 0.0, 0.1)")):
        config_from_hf(transformers.OpenAIGPTConfig(attn_pdrop=0.0))
    gpt = dict(ARCHITECTURES["gpt"][0].from_preset("gpt-tiny").config)
    assert config_from_hf(config_to_hf(gpt)) == gpt
    for change, named in [(dict(hidden_dim=64), "hidden_dim=64"), (dict(bias=False), "bias=False"),
                          (dict(num_kv_heads=2), "num_kv_heads=2")]:
        with pytest.raises(ValueError, match=re.escape(named)): config_to_hf(gpt | change)
