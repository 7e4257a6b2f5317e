"""Contract tests for the models: GPT, GPT-2, LLaMA, Mistral, the KV caches and generation."""
import pytest
import torch

from llm_book.core.kv_cache import KVCache, RollingKVCache, kv_cache_bytes
from llm_book.models.configs import PRESETS, count_parameters, get_config
from llm_book.models.gpt import GPT, GPT2
from llm_book.models.llama import Llama
from llm_book.models.mistral import Mistral

MODELS = {"gpt": (GPT, "gpt-tiny"), "gpt2": (GPT2, "gpt2-tiny"), "llama": (Llama, "llama-tiny"),
          "mistral": (Mistral, "mistral-tiny")}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    "Tiny models run fastest (and most predictably on a shared machine) on one thread."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(arch, **overrides):
    cls, preset = MODELS[arch]
    torch.manual_seed(0)
    return cls.from_preset(preset, **overrides).eval()


def random_ids(batch_size, length, vocab_size=128, seed=1):
    return torch.randint(0, vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))


def cached_logits(model, ids, chunks, mask=None):
    "Run `ids` through the model in chunks of the given sizes with a cache; concatenate the logits."
    cache, outputs, start = None, [], 0
    for size in chunks:
        chunk_mask = None if mask is None else mask[:, start:start + size]
        logits, cache = model(ids[:, start:start + size], chunk_mask, cache=cache, use_cache=True)
        outputs.append(logits)
        start += size
    assert start == ids.shape[1]
    return torch.cat(outputs, 1), cache


# ---------------------------------------------------------------- the call contract
@pytest.mark.parametrize("arch", MODELS)
def test_logits_shape_and_dtype(arch):
    model = build(arch)
    logits = model(random_ids(2, 9))
    assert logits.shape == (2, 9, 128) and logits.dtype == torch.float32
    logits, cache = model(random_ids(2, 9), use_cache=True)
    assert isinstance(cache, KVCache) and cache.num_layers == len(cache) == model.num_layers   # one object, all layers
    K, V = cache[0]                                           # a layer's keys and values: cache[layer_idx]
    kv_heads = model.config.get("num_kv_heads") or model.config["num_heads"]
    held = min(9, model.config.get("window_size") or 9)       # Mistral's rolling cache keeps its window
    assert K.shape == V.shape == (2, kv_heads, held, 8)


@pytest.mark.parametrize("arch", MODELS)
def test_cache_parity_logits(arch):
    model = build(arch)
    ids = random_ids(2, 24)
    full = model(ids)
    for chunks in ([24], [10, 1, 1, 12], [1] * 24):
        stepwise, cache = cached_logits(model, ids, chunks)
        torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=0)
        assert cache.num_seen == 24


@pytest.mark.parametrize("arch", MODELS)
def test_new_cache_to_start(arch):
    model = build(arch)
    ids = random_ids(1, 6)
    logits, cache = model(ids, cache=model.new_cache(), use_cache=True)
    torch.testing.assert_close(logits, model(ids), atol=1e-5, rtol=0)
    logits, _ = model(ids, use_cache=True)                  # use_cache without a cache makes one
    torch.testing.assert_close(logits, model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("window_size", [4, 8])
def test_mistral_long_sequences(window_size):
    "Sequences many windows long: prefill longer than the window, then single-token decode, in bounded memory."
    model = build("mistral", window_size=window_size)
    length = 5 * window_size
    ids = random_ids(2, length)
    full = model(ids)
    stepwise, cache = cached_logits(model, ids, [window_size + 3] + [1] * (length - window_size - 3))
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=0)
    assert isinstance(cache, RollingKVCache) and cache.capacity == window_size
    assert all(K.shape[2] == window_size for K, V in cache)
    # the window changes the result: a LLaMA with the same weights differs late in the sequence
    llama = Llama(get_config("llama-tiny", max_position_embeddings=256)).eval()
    llama.load_state_dict(model.state_dict())
    torch.testing.assert_close(llama(ids)[:, :window_size], full[:, :window_size], atol=1e-5, rtol=0)
    assert not torch.allclose(llama(ids)[:, -1], full[:, -1], atol=1e-3)


@pytest.mark.parametrize("arch", MODELS)
def test_greedy_generation_cache_parity(arch):
    model = build(arch)
    prompt = random_ids(2, 5)
    num_new = 40 if arch != "gpt" and arch != "gpt2" else 30     # learned positions: 64 at most
    cached = model.generate(prompt, max_new_tokens=num_new)
    assert cached.dtype == torch.int64 and cached.shape == (2, 5 + num_new)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=num_new, use_cache=False))


@pytest.mark.parametrize("window_size", [4, 6])
def test_mistral_generation_far_past_window(window_size):
    model = build("mistral", window_size=window_size)
    prompt = random_ids(2, 3)
    cached = model.generate(prompt, max_new_tokens=8 * window_size)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=8 * window_size, use_cache=False))


# ---------------------------------------------------------------- padding
def left_padded_batch(length=10, pad=4):
    long_row, short_row = random_ids(1, length, seed=2), random_ids(1, length - pad, seed=3)
    padded = torch.cat([torch.full((1, pad), 7), short_row], 1)        # pad id is arbitrary: masked out
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, :pad] = False
    return torch.cat([long_row, padded]), mask, short_row, pad


@pytest.mark.parametrize("arch", MODELS)
def test_left_padding_matches_row_alone(arch):
    model = build(arch)
    batch, mask, short, pad = left_padded_batch()
    alone = model(short)[0]
    torch.testing.assert_close(model(batch, mask)[1, pad:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(batch[:1], mask[:1])[0], model(batch[:1])[0], atol=1e-6, rtol=0)
    stepwise, _ = cached_logits(model, batch, [6, 1, 1, 2], mask)       # mask of the new tokens only
    torch.testing.assert_close(stepwise[1, pad:], alone, atol=1e-5, rtol=0)
    # Hugging Face style: in cached mode the mask may cover cached + new tokens
    _, cache = model(batch[:, :6], mask[:, :6], use_cache=True)
    logits, _ = model(batch[:, 6:], mask, cache=cache, use_cache=True)
    torch.testing.assert_close(logits[1], alone[6 - pad:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_generation_matches_row_alone(arch, use_cache):
    model = build(arch)
    batch, mask, short, pad = left_padded_batch()
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=20, use_cache=use_cache)
    assert torch.equal(generated[1, pad:], model.generate(short, max_new_tokens=20)[0])
    assert torch.equal(generated[0], model.generate(batch[:1], max_new_tokens=20)[0])


def test_integer_mask_accepted():
    model = build("llama")
    batch, mask, _, _ = left_padded_batch()
    torch.testing.assert_close(model(batch, mask.long()), model(batch, mask))


# ---------------------------------------------------------------- generation semantics
def test_max_length_counts_the_prompt():
    model = build("llama")
    prompt = random_ids(1, 4)
    assert model.generate(prompt, max_length=10).shape == (1, 10)
    assert torch.equal(model.generate(prompt, max_length=10), model.generate(prompt, max_new_tokens=6))


def test_stream_yields_the_generated_tokens():
    model = build("gpt2")
    prompt = random_ids(2, 4)
    streamed = list(model.stream(prompt, max_new_tokens=7))
    assert len(streamed) == 7 and all(t.shape == (2,) and t.dtype == torch.int64 for t in streamed)
    assert torch.equal(torch.stack(streamed, 1), model.generate(prompt, max_new_tokens=7)[:, 4:])


def test_eos_stops_rows_and_pads_with_eos():
    model = build("llama")
    prompt = random_ids(2, 4)
    greedy = model.generate(prompt, max_new_tokens=12)
    eos = greedy[0, 6].item()                                  # row 0 emits this as its 3rd new token
    stopped = model.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    first = (greedy[0, 4:] == eos).nonzero()[0].item() + 4
    assert torch.equal(stopped[0, :first + 1], greedy[0, :first + 1])
    assert (stopped[0, first:] == eos).all()                   # padded with eos after stopping
    row1_eos = (greedy[1, 4:] == eos).nonzero()
    if len(row1_eos) == 0:                                      # row 1 never stops: it runs to the end
        assert stopped.shape == greedy.shape and torch.equal(stopped[1], greedy[1])
    # when every row stops, generation ends early
    both = model.generate(prompt[:1], max_new_tokens=12, eos_token_id=eos)
    assert both.shape[1] == first + 1


def test_sampling_is_reproducible_with_seed():
    model = build("mistral")
    prompt = random_ids(2, 4)
    kwargs = dict(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    first = model.generate(prompt, **kwargs)
    assert torch.equal(first, model.generate(prompt, **kwargs))
    assert torch.equal(first, model.generate(prompt, use_cache=False, **kwargs))
    assert not torch.equal(first, model.generate(prompt, **{**kwargs, "seed": 124}))
    top1 = model.generate(prompt, max_new_tokens=15, temperature=1.0, top_k=1, seed=5)
    assert torch.equal(top1, model.generate(prompt, max_new_tokens=15))   # top-k 1 is greedy


def test_generate_restores_training_mode_and_needs_no_grad():
    model = build("gpt2").train()
    out = model.generate(random_ids(1, 3), max_new_tokens=3)
    assert model.training and not out.requires_grad


def test_generate_preallocates_the_cache():
    "The cache is sized once (prompt + new tokens): the decode loop never reallocates."
    model = build("llama")
    cache = model.new_cache(max_length=20)
    _, cache = model(random_ids(1, 5), cache=cache, use_cache=True)
    buffer = cache.keys[0]
    for step in range(15):
        _, cache = model(random_ids(1, 1, seed=step), cache=cache, use_cache=True)
    assert cache.keys[0] is buffer and cache.capacity == 20


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_float32_logits(arch, dtype):
    model = build(arch)
    ids = random_ids(2, 6)
    reference = model(ids)
    half = build(arch).to(dtype)
    logits = half(ids)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=0.1, rtol=0)
    out = half.generate(ids, max_new_tokens=4)
    assert out.shape == (2, 10)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("arch", MODELS)
def test_bad_input_ids(arch):
    model = build(arch)
    with pytest.raises(ValueError, match="input_ids has id 128 >= vocab_size 128"):
        model(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match="input_ids has id -3 < 0"):
        model(torch.tensor([[1, -3]]))
    with pytest.raises(ValueError, match="input_ids must be an int64 tensor"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\)"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be an int64 tensor"):
        model([[1, 2]])


@pytest.mark.parametrize("arch", MODELS)
def test_bad_attention_mask(arch):
    model = build(arch)
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, T\) = \(2, 5\)"):
        model(ids, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(ids, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask must be bool"):
        model(ids, torch.ones(2, 5) * 0.5)


@pytest.mark.parametrize("arch", ["gpt", "gpt2"])
def test_learned_positions_have_a_limit(arch):
    model = build(arch)
    with pytest.raises(ValueError, match="max_position_embeddings is 64"):
        model(random_ids(1, 65))
    _, cache = model(random_ids(1, 60), use_cache=True)
    with pytest.raises(ValueError, match="max_position_embeddings is 64"):
        model(random_ids(1, 5), cache=cache)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 64"):
        model.generate(random_ids(1, 60), max_new_tokens=5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_rope_models_extend_past_max_positions(arch):
    model = build(arch, max_position_embeddings=32)
    ids = random_ids(1, 48)
    stepwise, _ = cached_logits(model, ids, [40, 8])
    torch.testing.assert_close(stepwise, model(ids), atol=1e-5, rtol=0)


def test_cache_from_another_model_is_rejected():
    llama, gpt2 = build("llama"), build("gpt2")
    ids = random_ids(1, 4)
    _, gpt2_cache = gpt2(ids, use_cache=True)
    with pytest.raises(ValueError, match="another model"):
        llama(ids, cache=gpt2_cache)
    three_layers = build("llama", num_layers=3)
    with pytest.raises(ValueError, match="cache has 3 layers, model has 2"):
        llama(ids, cache=three_layers.new_cache())
    with pytest.raises(ValueError, match="cache has window_size 8"):
        llama(ids, cache=build("mistral").new_cache())
    with pytest.raises(ValueError, match="cache must be one KVCache for all layers"):
        llama(ids, cache=[(torch.zeros(1), torch.zeros(1))] * 2)
    _, cache = llama(ids, use_cache=True)
    with pytest.raises(ValueError, match="cache holds a batch of 1 rows, got 2"):      # batch size changed
        llama(random_ids(2, 1), cache=cache)


def test_generate_argument_errors():
    model = build("llama")
    prompt = random_ids(1, 4)
    for kwargs, message in [({}, "give max_new_tokens or max_length"),
                            ({"max_new_tokens": 0}, "nothing to generate"),
                            ({"max_length": 4}, "nothing to generate"),
                            ({"max_length": 8, "max_new_tokens": 2}, "not both"),
                            ({"max_new_tokens": 2, "temperature": -0.5}, "temperature"),
                            ({"max_new_tokens": 2, "top_k": 0}, "top_k"),
                            ({"max_new_tokens": 2, "top_p": 0.0}, "top_p")]:
        with pytest.raises(ValueError, match=message):
            model.generate(prompt, **kwargs)
    with pytest.raises(ValueError, match="input_ids has id"):
        model.stream(torch.tensor([[999]]), max_new_tokens=2)          # raised before the first token
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(prompt, attention_mask=torch.ones(1, 3, dtype=torch.bool), max_new_tokens=2)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        Llama.from_preset("llama-1t")
    with pytest.raises(ValueError, match="Llama builds 'llama'"):
        Llama(get_config("gpt2-tiny"))
    with pytest.raises(ValueError, match="use Mistral"):
        Llama(get_config("llama-tiny", window_size=4))
    with pytest.raises(ValueError, match="not divisible by num_kv_heads"):
        Llama.from_preset("llama-tiny", num_kv_heads=3)


# ---------------------------------------------------------------- structure, sizes, memory
def test_state_dict_names():
    gpt2, llama = build("gpt2"), build("llama")
    gpt2_names, llama_names = set(gpt2.state_dict()), set(llama.state_dict())
    assert {"token_embeddings.embedding.weight", "position_embeddings.embedding.weight",
            "layers.0.attention_norm.weight", "layers.0.attention.qkv_proj.bias", "layers.0.attention.out_proj.weight",
            "layers.1.ffn_norm.bias", "layers.1.feed_forward.up_proj.weight", "layers.1.feed_forward.down_proj.weight",
            "final_norm.weight", "lm_head.weight"} <= gpt2_names
    assert {"token_embeddings.embedding.weight", "layers.0.attention_norm.weight", "layers.0.attention.qkv_proj.weight",
            "layers.1.feed_forward.gate_up_proj.weight", "layers.1.feed_forward.down_proj.weight",
            "final_norm.weight", "lm_head.weight"} <= llama_names
    assert gpt2.lm_head.weight is gpt2.token_embeddings.weight                 # tied
    assert llama.lm_head.weight is not llama.token_embeddings.weight           # untied unless configured
    smol = Llama(get_config("llama-tiny", tie_word_embeddings=True))
    assert smol.lm_head.weight is smol.token_embeddings.weight


def test_gpt2_initialization():
    torch.manual_seed(0)
    model = GPT2.from_preset("gpt2-tiny", embed_dim=128, num_layers=8)
    residual = torch.cat([model.layers[i].attention.out_proj.weight.flatten() for i in range(8)])
    other = torch.cat([model.layers[i].attention.qkv_proj.weight.flatten() for i in range(8)])
    assert abs(residual.std().item() - 0.02 / 16 ** 0.5) < 5e-4
    assert abs(other.std().item() - 0.02) < 5e-4
    assert model.layers[0].attention.qkv_proj.bias.abs().sum().item() == 0


@pytest.mark.parametrize("cls,name,published", [(GPT2, "gpt2", 124.44e6), (Llama, "llama-7b", 6.74e9),
                                                 (Mistral, "mistral-7b", 7.24e9), (Llama, "smollm2-135m", 134.5e6),
                                                 (GPT, "gpt", 116.5e6)])
def test_parameter_counts(cls, name, published):
    with torch.device("meta"):
        model = cls.from_preset(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == count_parameters(get_config(name))
    assert abs(count / published - 1) < 0.01


@pytest.mark.parametrize("arch", MODELS)
def test_count_parameters_matches_tiny_models(arch):
    model = build(arch)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)


def test_presets():
    smol = get_config("smollm2-135m")
    assert (smol["vocab_size"], smol["embed_dim"], smol["num_layers"], smol["num_heads"], smol["num_kv_heads"],
            smol["hidden_dim"], smol["rope_base"], smol["norm_eps"], smol["tie_word_embeddings"],
            smol["max_position_embeddings"]) == (49152, 576, 30, 9, 3, 1536, 100000.0, 1e-5, True, 8192)
    for name in ["gpt2", "gpt2-medium", "llama-7b", "mistral-7b", "smollm2-135m", "gpt2-tiny", "llama-tiny", "mistral-tiny"]:
        assert name in PRESETS


def test_kv_cache_bytes_formula():
    llama, mistral = get_config("llama-7b"), get_config("mistral-7b")
    # 2 (K and V) x layers x KV heads x head_dim x tokens x 2 bytes (fp16)
    assert kv_cache_bytes(llama, 4096) == 2 * 32 * 32 * 128 * 4096 * 2 == 2 * 2**30
    assert kv_cache_bytes(llama, 32768) == 16 * 2**30
    assert kv_cache_bytes(mistral, 4096) == 2 * 32 * 8 * 128 * 4096 * 2 == 2**29
    assert kv_cache_bytes(mistral, 32768) == 2**29                     # the rolling buffer stops at the window
    assert kv_cache_bytes(mistral, 1000) == 2 * 32 * 8 * 128 * 1000 * 2
    assert kv_cache_bytes(llama, 100, dtype=torch.float32, batch_size=3) == 6 * kv_cache_bytes(llama, 100)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_kv_cache_bytes_match_the_allocated_cache(arch):
    model = build(arch)
    num_tokens = 30                                                    # past mistral-tiny's window of 8
    cache = model.new_cache(max_length=num_tokens)
    model(random_ids(2, 10), cache=cache, use_cache=True)
    for step in range(num_tokens - 10):
        model(random_ids(2, 1, seed=step), cache=cache, use_cache=True)
    held = sum(K.nelement() * K.element_size() + V.nelement() * V.element_size() for K, V in cache)
    allocated = sum(keys.nelement() * keys.element_size() * 2 for keys in cache.keys)
    expected = kv_cache_bytes(model.config, num_tokens, dtype=torch.float32, batch_size=2)
    assert held == allocated == expected


def test_rolling_cache_memory_bounded():
    cache = RollingKVCache(window_size=5)
    for step in range(200):
        k = torch.randn(1, 2, 1, 4)
        cache.add_tokens(torch.tensor([[step]]))
        cache.update(0, k, k)
        cache.commit()
    assert cache.capacity == 5 and cache.num_seen == 200
    assert sorted(cache.positions[0].tolist()) == list(range(195, 200))


# ---------------------------------------------------------------- numerical truth: Hugging Face Transformers
def hf_llama_state_dict(hf_state, num_layers):
    "Hugging Face LLaMA/Mistral names -> ours (fused [q|k|v] and [gate|up] projections)."
    new = {"token_embeddings.embedding.weight": hf_state["model.embed_tokens.weight"],
           "final_norm.weight": hf_state["model.norm.weight"], "lm_head.weight": hf_state["lm_head.weight"]}
    for i in range(num_layers):
        hf = lambda name: hf_state[f"model.layers.{i}.{name}.weight"]
        new[f"layers.{i}.attention.qkv_proj.weight"] = torch.cat([hf("self_attn.q_proj"), hf("self_attn.k_proj"),
                                                                  hf("self_attn.v_proj")])
        new[f"layers.{i}.attention.out_proj.weight"] = hf("self_attn.o_proj")
        new[f"layers.{i}.feed_forward.gate_up_proj.weight"] = torch.cat([hf("mlp.gate_proj"), hf("mlp.up_proj")])
        new[f"layers.{i}.feed_forward.down_proj.weight"] = hf("mlp.down_proj")
        new[f"layers.{i}.attention_norm.weight"] = hf("input_layernorm")
        new[f"layers.{i}.ffn_norm.weight"] = hf("post_attention_layernorm")
    return new


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_matches_hugging_face(arch):
    "Random tiny HF model, weights copied over: same logits, also far past Mistral's window and with padding."
    transformers = pytest.importorskip("transformers")
    model = build(arch)
    c = model.config
    kwargs = dict(vocab_size=c["vocab_size"], hidden_size=c["embed_dim"], intermediate_size=c["hidden_dim"],
                  num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
                  num_key_value_heads=c["num_kv_heads"], max_position_embeddings=c["max_position_embeddings"],
                  rms_norm_eps=c["norm_eps"], rope_theta=c["rope_base"], attn_implementation="eager")
    torch.manual_seed(0)
    if arch == "mistral":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=c["window_size"], **kwargs))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    hf.eval()
    model.load_state_dict(hf_llama_state_dict(hf.state_dict(), c["num_layers"]))
    ids = random_ids(2, 5 * 8)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :5] = False
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
        theirs = hf(ids, attention_mask=mask.long()).logits
    ours = model(ids, mask)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1, 5:], theirs[1, 5:], atol=1e-5, rtol=0)


def test_llama_presets_are_named_after_the_model_they_are():
    "LLaMA (v1) was trained at 2048 tokens with RMSNorm eps 1e-6; LLaMA-2 at 4096 with 1e-5; same shapes."
    v1, v2 = get_config("llama-7b"), get_config("llama-2-7b")
    assert (v1["max_position_embeddings"], v1["norm_eps"]) == (2048, 1e-6)
    assert (v2["max_position_embeddings"], v2["norm_eps"]) == (4096, 1e-5)
    assert count_parameters(v1) == count_parameters(v2) == 6_738_415_616
    assert (get_config("llama-13b")["max_position_embeddings"], get_config("llama-2-13b")["max_position_embeddings"]) == (2048, 4096)


def test_registry_names_are_the_config_architectures():
    "One registry (chapter 17): its names are exactly the names a config may carry, each class under its own name."
    from llm_book.core.config import ARCHITECTURES
    from llm_book.models.registry import MODEL_CLASSES, REGISTRY, model_class
    assert tuple(REGISTRY) == ARCHITECTURES
    assert all(model_class(cls.architecture) is cls for cls in MODEL_CLASSES)
    assert len({cls.hf_class for cls in MODEL_CLASSES}) == len(MODEL_CLASSES)
