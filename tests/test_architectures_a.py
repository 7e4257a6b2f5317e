"""Issue 15, first half: Llama 3 RoPE scaling (`rope_scaling` of Llama, chapter 13) and Qwen3 (QK-norm, chapters 14a/14b).

Hugging Face parity both ways (fp32, with and without padding), cache and padding contracts, published parameter
counts on the meta device, and the configs' errors. The contract helpers are the ones of test_models.py / test_hf.py.
"""
import json
import re

import pytest
import torch
import transformers

from llm_book.core.config import ModelConfig
from llm_book.core.qk_norm import QKNorm
from llm_book.core.rope import RoPE, rope_frequencies
from llm_book.core.rope_scaling import check_rope_scaling, llama3_frequencies, rope_scaling_from_config
from llm_book.hf import config_from_hf, config_to_hf, from_hf, logits_max_diff, save_hf, to_hf
from llm_book.models.configs import count_parameters, get_config
from llm_book.models.llama import Llama
from llm_book.models.qwen3 import Qwen3
from test_hf import batch, random_hf_model, random_model
from test_models import cached_logits, left_padded_batch, random_ids

transformers.utils.logging.disable_progress_bar()
TOL = 1e-5
# a training context of 16 tokens: a 40-token batch needs the scaled (slow) pairs
TINY_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=16)
LLAMA3 = dict(rope_base=500.0, rope_scaling=TINY_SCALING)   # overrides of llama-tiny
MODELS = {"qwen3": ("qwen3", {}), "llama3": ("llama", LLAMA3)}    # name -> (architecture, overrides of its tiny preset)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name, seed=0):
    arch, overrides = MODELS[name]
    return random_model(arch, seed, **overrides)


# ---------------------------------------------------------------- Hugging Face parity, both ways
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("padded", [False, True])
def test_ours_to_hf_logits(name, padded):
    model = build(name)
    hf_model = to_hf(model)
    assert type(hf_model).__name__ == {"qwen3": "Qwen3ForCausalLM", "llama3": "LlamaForCausalLM"}[name]
    input_ids, mask = batch(40, padded)
    assert logits_max_diff(model, hf_model, input_ids, mask) < TOL


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("padded", [False, True])
def test_hf_to_ours_logits(name, padded):
    arch, overrides = MODELS[name]
    hf_model = random_hf_model(arch, **overrides)
    ours = from_hf(hf_model)
    assert type(ours) is {"qwen3": Qwen3, "llama3": Llama}[name]
    input_ids, mask = batch(40, padded)
    assert logits_max_diff(ours, hf_model, input_ids, mask) < TOL


def test_llama3_scaling_changes_the_logits():
    "The scaled model differs from the unscaled one with the same weights: parity above could not pass by ignoring it."
    scaled = build("llama3")
    unscaled = Llama(get_config("llama-tiny", rope_base=500.0)).eval()
    unscaled.load_state_dict(scaled.state_dict())
    input_ids, mask = batch(40)
    assert logits_max_diff(unscaled, to_hf(scaled), input_ids, mask) > 1e-3


def test_qk_norm_weights_are_converted():
    "Qwen3's q_norm / k_norm weights matter and travel: changing one on the 🤗 side breaks parity."
    hf_model = random_hf_model("qwen3")
    ours = from_hf(hf_model)
    input_ids, mask = batch(20)
    with torch.no_grad(): hf_model.model.layers[1].self_attn.k_norm.weight.mul_(1.5)
    assert logits_max_diff(ours, hf_model, input_ids, mask) > 1e-3


def test_qwen3_attention_bias_round_trips():
    "Qwen3's attention_bias puts biases on q, k, v, o only (its MLP never has one), both ways."
    model = random_model("qwen3", bias=True)
    assert model.layers[0].attention.qkv_proj.bias is not None
    assert all(getattr(m, "bias", None) is None for m in model.layers[0].feed_forward.modules() if m is not model.layers[0].feed_forward)
    hf_model = to_hf(model)
    assert hf_model.config.attention_bias and hf_model.model.layers[0].mlp.up_proj.bias is None
    input_ids, mask = batch(20)
    assert logits_max_diff(model, hf_model, input_ids, mask) < TOL
    back = from_hf(hf_model)
    assert back.config["bias"] and logits_max_diff(back, hf_model, input_ids, mask) < TOL
    assert count_parameters(model.config) == sum(p.numel() for p in model.parameters())


def test_save_hf_loads_with_auto_model(tmp_path):
    for name in MODELS:
        model = build(name)
        path = save_hf(model, tmp_path / name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        input_ids, mask = batch(40)
        assert logits_max_diff(model, loaded, input_ids, mask) < TOL
        assert from_hf(path).config == model.config                               # and back, from the directory


@pytest.mark.parametrize("name", MODELS)
def test_config_round_trips_through_hf(name):
    model = build(name)
    assert config_from_hf(config_to_hf(model.config)) == model.config
    if name == "llama3":
        assert config_to_hf(model.config).rope_parameters["rope_type"] == "llama3"


def test_llama3_frequencies_equal_transformers():
    "Our frequency table is Transformers' `_compute_llama3_parameters` for Llama 3.2 1B, bit for bit."
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = get_config("llama-3.2-1b")
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config_to_hf(config))
    ours = RoPE(64, 16, base=500000.0, scaling=rope_scaling_from_config(config["rope_scaling"])).inv_freq
    assert attention_factor == 1.0 and torch.equal(ours, theirs)
    assert not torch.equal(ours, rope_frequencies(64, 500000.0))


REFUSED = [  # (🤗 config class, fields, what the error must name)
    (transformers.Qwen3Config, dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), "use_sliding_window"),
    (transformers.Qwen3Config, dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (transformers.Qwen3Config, dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=2.0)), "rope_type']='yarn'"),
    (transformers.LlamaConfig, dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)), "rope_type']='linear'"),
    (transformers.LlamaConfig, dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=4.0,
                                                         high_freq_factor=1.0, original_max_position_embeddings=16)),
     "high_freq_factor"),
]


@pytest.mark.parametrize("hf_class, fields, named", REFUSED, ids=lambda v: repr(v) if isinstance(v, dict) else str(v))
def test_unsupported_hf_settings_are_refused_by_name(hf_class, fields, named):
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    with pytest.raises(ValueError, match=re.escape(named)): config_from_hf(hf_class(**(base | fields)))


# ---------------------------------------------------------------- cache and padding contracts
@pytest.mark.parametrize("name", MODELS)
def test_cache_parity_logits(name):
    model = build(name)
    ids = random_ids(2, 40)
    full = model(ids)
    for chunks in ([40], [17, 1, 1, 21], [1] * 40):
        stepwise, cache = cached_logits(model, ids, chunks)
        torch.testing.assert_close(stepwise, full, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_cache_parity(name):
    model = build(name)
    prompt = random_ids(2, 5)
    cached = model.generate(prompt, max_new_tokens=40)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=40, use_cache=False))


@pytest.mark.parametrize("name", MODELS)
def test_left_padding_matches_row_alone(name):
    model = build(name)
    padded, mask, short, pad = left_padded_batch()
    torch.testing.assert_close(model(padded, mask)[1, pad:], model(short)[0], atol=TOL, rtol=0)
    generated = model.generate(padded, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(generated[1, pad:], model.generate(short, max_new_tokens=20)[0])
    assert torch.equal(generated[0], model.generate(padded[:1], max_new_tokens=20)[0])


# ---------------------------------------------------------------- published sizes, on the meta device
@pytest.mark.parametrize("cls, name, published, without_embeddings", [
    (Llama, "llama-3.2-1b", 1.24e9, None),          # Meta's model card: 1.24B (1.23B), tied embeddings
    (Qwen3, "qwen3-0.6b", 0.6e9, 0.44e9),            # Qwen3 model cards: total and non-embedding parameters
    (Qwen3, "qwen3-4b", 4.0e9, 3.6e9),
])
def test_published_parameter_counts(cls, name, published, without_embeddings):
    config = get_config(name)
    with torch.device("meta"): model = cls(config)
    assert next(model.parameters()).device.type == "meta"
    num_params = sum(p.numel() for p in model.parameters())                       # tied weights counted once
    assert num_params == count_parameters(config)
    assert abs(num_params / published - 1) < 0.01
    if without_embeddings:
        assert abs((num_params - config["vocab_size"] * config["embed_dim"]) / without_embeddings - 1) < 0.01


def test_presets_have_the_published_shapes():
    qwen = ModelConfig.from_dict(get_config("qwen3-0.6b"))
    assert (qwen.vocab_size, qwen.num_layers, qwen.embed_dim, qwen.num_heads, qwen.num_kv_heads, qwen.head_dim,
            qwen.hidden_dim, qwen.tie_word_embeddings) == (151936, 28, 1024, 16, 8, 128, 3072, True)
    llama = ModelConfig.from_dict(get_config("llama-3.2-1b"))
    assert (llama.vocab_size, llama.num_layers, llama.embed_dim, llama.num_heads, llama.num_kv_heads, llama.hidden_dim,
            llama.tie_word_embeddings, llama.rope_base) == (128256, 16, 2048, 32, 8, 8192, True, 500000.0)
    assert llama.rope_scaling == dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192)


# ---------------------------------------------------------------- the parts and the config
def test_qk_norm_bounds_the_attention_logits():
    "With QK-norm (unit gains) |q·k|/sqrt(d) <= sqrt(d), whatever the scale of q and k."
    q, k = torch.randn(1, 2, 6, 16) * 100, torch.randn(1, 2, 6, 16) * 100
    q_hat, k_hat = QKNorm(16)(q, k)
    assert (q_hat @ k_hat.transpose(-1, -2) / 4).abs().max() <= 4 + 1e-4
    assert (q @ k.transpose(-1, -2) / 4).abs().max() > 100


def test_rope_scaling_survives_a_cast():
    model = build("llama3").to(torch.bfloat16)
    model(random_ids(1, 4))                                                       # tables rebuilt in fp32
    expected = llama3_frequencies(rope_frequencies(8, 500.0), **{k: v for k, v in TINY_SCALING.items() if k != "rope_type"})
    assert model.rope.inv_freq.dtype == torch.float32 and torch.equal(model.rope.inv_freq, expected)


@pytest.mark.parametrize("overrides, message", [
    (dict(rope_scaling=dict(TINY_SCALING, rope_type="yarn")), "config['rope_scaling']['rope_type'] must be one of ('llama3',)"),
    (dict(rope_scaling=dict(TINY_SCALING, factor=0.5)), "config['rope_scaling']['factor'] must be a number >= 1"),
    (dict(rope_scaling={k: v for k, v in TINY_SCALING.items() if k != "low_freq_factor"}), "missing ['low_freq_factor']"),
    (dict(rope_scaling=dict(TINY_SCALING, original_max_position_embeddings=16.0)), "['original_max_position_embeddings'] must be a positive int"),
    (dict(rope_scaling="llama3"), "config['rope_scaling'] must be a dict"),
])
def test_bad_rope_scaling_is_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)): Llama(get_config("llama-tiny", **overrides))


def test_keys_a_model_would_ignore_are_refused():
    with pytest.raises(ValueError, match=re.escape("config['rope_scaling'] is not supported by architecture 'gpt2'")):
        get_config("gpt2-tiny", rope_scaling=TINY_SCALING)
    with pytest.raises(ValueError, match=re.escape("qwen3 has no sliding window")):
        get_config("qwen3-tiny", window_size=4)
    with pytest.raises(ValueError, match="config is for architecture 'llama', Qwen3 builds 'qwen3'"):
        Qwen3(get_config("llama-tiny"))


def test_rope_scaling_config_round_trips_through_json():
    config = ModelConfig.from_dict(get_config("llama-tiny", **LLAMA3))
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    given = dict(TINY_SCALING)
    config = ModelConfig.from_dict(get_config("llama-tiny", rope_scaling=given))
    given["factor"] = 2.0                                                         # the config holds its own copy
    assert config.rope_scaling["factor"] == 8.0
    assert check_rope_scaling(TINY_SCALING) == TINY_SCALING


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_rope_scaling_converts_for_every_rope_architecture(arch):
    "`rope_scaling` is a RoPE setting, not a Llama one: Mistral and Qwen3 carry it to Transformers and back too."
    model = random_model(arch, **LLAMA3)
    hf_model = to_hf(model)
    assert hf_model.config.rope_parameters["rope_type"] == "llama3"
    input_ids, mask = batch(40)
    assert logits_max_diff(model, hf_model, input_ids, mask) < TOL
    back = from_hf(hf_model)
    assert back.config == model.config and logits_max_diff(back, hf_model, input_ids, mask) < TOL
