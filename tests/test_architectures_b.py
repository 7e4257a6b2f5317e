"""Issue 15, second half: Mixtral (sparse mixture of experts) and Gemma 3 (text) against Transformers, their caches,
padding, presets and the Trainer's auxiliary loss."""
import pytest
import torch
import torch.nn.functional as F
import transformers

from llm_book.core.moe import SparseMoE, load_balancing_loss, top_k_routing
from llm_book.core.swi_glu import SwiGLU
from llm_book.hf import config_from_hf, config_to_hf, from_hf, logits_max_diff, to_hf
from llm_book.models.configs import count_parameters, get_config
from llm_book.models.mixtral import Mixtral, active_parameters
from llm_book.training.trainer import compute_loss

torch.set_num_threads(1)


def randomize(model, seed=0):
    "Every parameter random (norm gains around their neutral value), so that no weight hides a mistake."
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            neutral = 1.0 if name.endswith("norm.weight") and p.abs().sum() > 0 else 0.0   # Gemma's norms: 1 + w
            p.copy_(torch.randn_like(p) * 0.1 + neutral)
    return model.eval()


def padded_batch(vocab_size=128, length=14, pad=5, seed=1):
    "Two rows, the second left-padded by `pad` tokens, and its mask."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, :pad] = False
    return ids, mask


def num_parameters(model): return sum(p.numel() for p in model.parameters())


def assert_same_greedy(model, first, second, tolerance=1e-5):
    """Two greedy runs of `model` agree: token for token, or up to a step where the model's two best logits tie within
    `tolerance` and the runs took one each (rounding may pick either; after it the sequences rightly part)."""
    assert first.shape == second.shape, (first.shape, second.shape)
    for row in range(first.shape[0]):
        differ = (first[row] != second[row]).nonzero()
        if len(differ) == 0: continue
        t = int(differ[0])                                               # the first position where the runs part
        with torch.no_grad(): logits = model(first[row:row + 1, :t])[0, -1].float()   # (V,) uncached, the shared prefix
        a, b = int(first[row, t]), int(second[row, t])
        assert abs(float(logits[a] - logits[b])) < tolerance and float(logits.max() - logits[a]) < tolerance, \
            f"row {row} parts at position {t}: tokens {a} and {b}, logits {float(logits[a]):.6f} and {float(logits[b]):.6f}, best {float(logits.max()):.6f}"


# ---------------------------------------------------------------- the mixture-of-experts layer

def test_one_expert_equals_the_swiglu_layer():
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=1, top_k=1)
    swiglu = SwiGLU(16, 24)
    swiglu.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(moe(x), swiglu(x), rtol=0, atol=1e-6)


def test_k_equal_to_the_number_of_experts_is_the_weighted_dense_mixture():
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=5, top_k=5)
    x = torch.randn(2, 6, 16)
    probs = F.softmax(moe.router(x), dim=-1)                                     # (B, T, E)
    dense = sum(probs[..., e, None] * expert(x) for e, expert in enumerate(moe.experts))
    torch.testing.assert_close(moe(x), dense, rtol=0, atol=1e-5)


def test_top_k_routing_renormalises_over_the_chosen_experts():
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
    weights, experts = top_k_routing(logits, 2)
    assert experts.tolist() == [[0, 2]]
    torch.testing.assert_close(weights[0], F.softmax(torch.tensor([3.0, 2.0]), 0))
    with pytest.raises(ValueError, match="top_k must be in"):
        top_k_routing(logits, 0)
    with pytest.raises(ValueError, match="top_k must be in"):
        SparseMoE(8, 8, num_experts=2, top_k=3)


@pytest.mark.parametrize("padded", [False, True])
def test_aux_loss_matches_transformers_load_balancing_loss_func(padded):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.manual_seed(0)
    layers = [torch.randn(3 * 5, 6) for _ in range(4)]                           # 4 layers, B=3, T=5, E=6
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, :2] = False
    ours = load_balancing_loss(layers, 2, mask if padded else None)
    theirs = load_balancing_loss_func(tuple(layers), 6, 2, mask.long() if padded else None)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="attention_mask has 12 tokens, router_logits 15"):
        load_balancing_loss(layers, 2, mask[:, :-1])


# ---------------------------------------------------------------- Mixtral

def tiny_mixtral(seed=0, **overrides):
    return randomize(Mixtral(get_config("mixtral-tiny", **overrides)), seed)


@pytest.mark.parametrize("window_size", [None, 4])
def test_mixtral_logits_equal_transformers_both_ways(window_size):
    ours = tiny_mixtral(window_size=window_size)
    ids, mask = padded_batch()
    hf_model = to_hf(ours)
    assert isinstance(hf_model, transformers.MixtralForCausalLM)
    assert logits_max_diff(ours, hf_model, ids) < 1e-5
    assert logits_max_diff(ours, hf_model, ids, mask) < 1e-5
    torch.manual_seed(3)
    hf_random = transformers.MixtralForCausalLM(config_to_hf(ours.config)).eval()   # Transformers' own init
    back = from_hf(hf_random)
    assert isinstance(back, Mixtral)
    assert logits_max_diff(back, hf_random, ids, mask) < 1e-5
    assert ours.config == config_from_hf(hf_random.config)
    again = to_hf(back)   # and round trip: 🤗 → ours → 🤗 gives back the same tensors
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in hf_random.state_dict().items())


def test_mixtral_aux_loss_equals_transformers_after_a_forward():
    ours = tiny_mixtral()
    hf_model = to_hf(ours)
    ids, mask = padded_batch()
    assert ours.aux_loss is None
    ours(ids, attention_mask=mask)
    theirs = hf_model(ids, attention_mask=mask.long(), output_router_logits=True).aux_loss
    torch.testing.assert_close(ours.aux_loss, theirs, rtol=0, atol=1e-6)
    ours(ids)
    torch.testing.assert_close(ours.aux_loss, hf_model(ids, output_router_logits=True).aux_loss, rtol=0, atol=1e-6)


def test_mixtral_refuses_what_it_cannot_compute():
    hf_config = config_to_hf(get_config("mixtral-tiny"))
    hf_config.router_jitter_noise = 0.1
    with pytest.raises(ValueError, match="router_jitter_noise=0.1"):
        config_from_hf(hf_config)
    with pytest.raises(ValueError, match="bias=True"):
        config_to_hf(get_config("mixtral-tiny", bias=True))
    with pytest.raises(ValueError, match="'num_experts_per_tok'] 5 is more than num_experts 4"):
        Mixtral(get_config("mixtral-tiny", num_experts_per_tok=5))
    with pytest.raises(ValueError, match="'num_experts'] is not supported by architecture 'llama'"):
        get_config("llama-tiny", num_experts=4)


@pytest.mark.parametrize("window_size", [None, 4])
def test_mixtral_cached_greedy_equals_uncached_and_left_padding_equals_each_row_alone(window_size):
    model = tiny_mixtral(window_size=window_size)
    ids, mask = padded_batch()
    prompt = ids[:, :5]
    cached = model.generate(prompt, max_new_tokens=16)
    assert_same_greedy(model, cached, model.generate(prompt, max_new_tokens=16, use_cache=False))
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    for row in range(2):
        alone = model.generate(ids[row:row + 1, mask[row]], max_new_tokens=10)
        num_padding = int((~mask[row]).sum())
        assert_same_greedy(model, batch[row:row + 1, num_padding:], alone)


def test_mixtral_8x7b_parameters_total_and_active():
    config = get_config("mixtral-8x7b")
    with torch.device("meta"):
        model = Mixtral(config)
    total = num_parameters(model)
    assert total == count_parameters(config)
    assert abs(total / 46.7e9 - 1) < 0.01
    assert abs(active_parameters(config) / 12.9e9 - 1) < 0.01
    tiny = tiny_mixtral()
    assert num_parameters(tiny) == count_parameters(tiny.config)
    # one token uses the shared parts and k of the E experts
    expert = num_parameters(tiny.layers[0].feed_forward.experts[0])
    assert active_parameters(tiny.config) == num_parameters(tiny) - 2 * (4 - 2) * expert


def test_trainer_adds_the_weighted_aux_loss():
    model = tiny_mixtral().train()
    ids, _ = padded_batch()
    inputs, targets = ids[:, :-1], ids[:, 1:]
    loss = compute_loss(model, inputs, targets)
    cross_entropy = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, cross_entropy + 0.02 * model.aux_loss)
    loss.backward()                                   # the aux loss reaches the routers
    assert model.layers[0].feed_forward.router.weight.grad.abs().sum() > 0
    dense = randomize(Mixtral(get_config("mixtral-tiny", router_aux_loss_coef=0.0)))
    torch.testing.assert_close(compute_loss(dense, inputs, targets),
                               F.cross_entropy(dense(inputs).flatten(0, 1), targets.flatten()))


# ---------------------------------------------------------------- Gemma 3

from llm_book.core.gemma import GemmaQKVProjection, GemmaRMSNorm, GeGLU  # noqa: E402
from llm_book.models.gemma3 import Gemma3  # noqa: E402


def tiny_gemma3(seed=0, **overrides):
    return randomize(Gemma3(get_config("gemma3-tiny", **overrides)), seed)


@pytest.mark.parametrize("overrides", [{}, {"final_logit_softcapping": 5.0, "query_pre_attn_scalar": 24},
                                       {"sliding_window_pattern": 2, "window_size": 3, "num_kv_heads": 1}])
def test_gemma3_logits_equal_transformers_both_ways(overrides):
    ours = tiny_gemma3(**overrides)
    ids, mask = padded_batch(length=20, pad=6)                 # 20 tokens: 5 windows of 4
    hf_model = to_hf(ours)
    assert isinstance(hf_model, transformers.Gemma3ForCausalLM)
    assert logits_max_diff(ours, hf_model, ids) < 1e-5
    assert logits_max_diff(ours, hf_model, ids, mask) < 1e-5
    hf_random = randomize(transformers.Gemma3ForCausalLM(config_to_hf(ours.config)), seed=5)
    back = from_hf(hf_random)
    assert isinstance(back, Gemma3)
    assert logits_max_diff(back, hf_random, ids, mask) < 1e-5
    assert ours.config == config_from_hf(hf_random.config)


def test_gemma3_each_part_matters_for_parity():
    "Parity is no accident: a model without the local window, or without the sqrt(C) scale, differs from Transformers."
    ours = tiny_gemma3()
    ids, _ = padded_batch(length=20)
    hf_model = to_hf(ours)
    ours.is_local = (False,) * 6                               # every layer global
    assert logits_max_diff(ours, hf_model, ids) > 1e-3
    ours = tiny_gemma3()
    ours.embed = lambda input_ids, positions: ours.token_embeddings(input_ids)
    assert logits_max_diff(ours, hf_model, ids) > 1e-3


def test_gemma3_refuses_what_it_cannot_compute():
    base = dict(config_to_hf(get_config("gemma3-tiny")).to_dict())
    for field, value, message in [
            ("attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0"),
            ("use_bidirectional_attention", True, "use_bidirectional_attention=True"),
            ("hidden_activation", "gelu", "hidden_activation='gelu'"),
            ("layer_types", ["full_attention"] + ["sliding_attention"] * 5, "layer_types=")]:
        hf_config = transformers.Gemma3TextConfig(**{**base, field: value})
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
            config_from_hf(hf_config)
    scaled = transformers.Gemma3TextConfig(**base)
    scaled.rope_parameters["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    with pytest.raises(ValueError, match=r"rope_parameters\['full_attention'\]\['rope_type'\]='linear'"):
        config_from_hf(scaled)
    with pytest.raises(ValueError, match="window_size=None"):
        config_to_hf(get_config("gemma3-tiny", window_size=None))
    with pytest.raises(ValueError, match="'local_rope_base'] is not supported by architecture 'mistral'"):
        get_config("mistral-tiny", local_rope_base=10000.0)


def test_gemma3_cached_greedy_equals_uncached_and_left_padding_equals_each_row_alone():
    model = tiny_gemma3(final_logit_softcapping=30.0)
    ids, mask = padded_batch(length=12, pad=5)
    prompt = ids[:, :3]
    cached = model.generate(prompt, max_new_tokens=20)                    # far past the window of 4
    assert_same_greedy(model, cached, model.generate(prompt, max_new_tokens=20, use_cache=False))
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    for row in range(2):
        alone = model.generate(ids[row:row + 1, mask[row]], max_new_tokens=10)
        num_padding = int((~mask[row]).sum())
        assert_same_greedy(model, batch[row:row + 1, num_padding:], alone)
    # token by token through the cache = one pass over the whole sequence
    logits, cache = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    steps = [logits]
    for t in range(5, 12):
        step, cache = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
        steps.append(step)
    full = model(ids, attention_mask=mask)
    torch.testing.assert_close(torch.cat(steps, 1)[mask], full[mask], rtol=0, atol=1e-5)


def test_gemma3_270m_parameters():
    config = get_config("gemma3-270m")
    with torch.device("meta"):
        model = Gemma3(config)
    total = num_parameters(model)
    assert total == count_parameters(config)
    assert abs(total / 270e6 - 1) < 0.01
    assert sum(model.is_local) == 15 and model.is_local[5] is False
    tiny = tiny_gemma3()
    assert num_parameters(tiny) == count_parameters(tiny.config)


def test_gemma_parts():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    norm = GemmaRMSNorm(8)
    assert norm.weight.abs().sum() == 0                                   # the gain 1 + 0
    with torch.no_grad():
        norm.weight.fill_(0.25)
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * 1.25)
    geglu = GeGLU(8, 12)
    gate, up = geglu.gate_up_proj(x).chunk(2, -1)
    torch.testing.assert_close(geglu(x), geglu.down_proj(F.gelu(gate, approximate="tanh") * up))
    projection = GemmaQKVProjection(8, num_heads=2, num_kv_heads=1, head_dim=4, query_pre_attn_scalar=16)
    q = projection(x)[..., :8].view(2, 3, 2, 4)
    # normalised per head (gain 1), then scaled by sqrt(d_h / s) = 0.5
    torch.testing.assert_close(q.pow(2).mean(-1), torch.full((2, 3, 2), 0.25), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="query_pre_attn_scalar must be > 0"):
        GemmaQKVProjection(8, 2, 1, 4, query_pre_attn_scalar=0)


def test_the_cli_builds_both_architectures():
    from llm_book.cli import model_class
    from llm_book.core.config import ARCHITECTURES
    assert model_class("mixtral") is Mixtral and model_class("gemma3") is Gemma3
    for architecture in ARCHITECTURES:             # every architecture a config may name has a class
        assert model_class(architecture).architecture == architecture


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_gemma3])
def test_bf16_autocast_training_loss_is_finite_and_close_to_fp32(build):
    model = build().train()
    ids, _ = padded_batch()
    inputs, targets = ids[:, :-1], ids[:, 1:]
    fp32 = compute_loss(model, inputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = compute_loss(model, inputs, targets)
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 0.1 * fp32.item()
    bf16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_kv_cache_bytes_counts_what_each_cache_holds():
    from llm_book.core.kv_cache import kv_cache_bytes
    # Mixtral with a window keeps a rolling buffer; Gemma 3's one cache keeps every token for its global layers
    mixtral, gemma = tiny_mixtral(window_size=4), tiny_gemma3()
    for model, held in [(mixtral, 4), (gemma, 12)]:
        _, cache = model(torch.randint(0, 128, (1, 12)), use_cache=True)
        keys, values = cache[0]
        assert keys.shape[2] >= held
        c = model.config
        assert kv_cache_bytes(c, 12, dtype=torch.float32) == 2 * c.num_layers * c.num_kv_heads * c.head_dim * held * 4


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_gemma3])
def test_save_hf_and_load_the_directory_back(build, tmp_path):
    from llm_book.hf import save_hf
    model = build()
    path = save_hf(model, tmp_path / "checkpoint")
    back = from_hf(path)
    assert type(back) is type(model) and back.config == model.config
    ids, mask = padded_batch()
    torch.testing.assert_close(back(ids, attention_mask=mask), model(ids, attention_mask=mask), rtol=0, atol=0)
