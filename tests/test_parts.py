"""The building blocks (chapters 03a-06d) checked against PyTorch's own layers and independent references."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_book.core.feed_forward import FeedForward
from llm_book.core.gelu import GELU
from llm_book.core.positional_embeddings import PositionalEmbeddings, sinusoidal_embeddings
from llm_book.core.rms_norm import RMSNorm
from llm_book.core.rope import RoPE, interleaved_to_half_split, rope_frequencies
from llm_book.core.silu import SiLU
from llm_book.core.swi_glu import SwiGLU, swiglu_hidden_dim
from llm_book.core.token_embeddings import TokenEmbeddings


# ---------------------------------------------------------------- references written independently of llm_book
def rope_complex_reference(x, positions, base=10000.0):
    "Meta LLaMA's formulation: adjacent pairs as complex numbers times exp(i * position * theta). x (B, H, T, hd)."
    head_dim = x.shape[-1]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = positions.float()[..., None] * freqs  # (T, hd/2) or (B, T, hd/2)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    if positions.ndim == 2:
        freqs_cis = freqs_cis[:, None]  # (B, 1, T, hd/2)
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_complex * freqs_cis).flatten(-2).type_as(x)


def rope_rotate_half_reference(x, positions, base=10000.0):
    "Hugging Face LLaMA's formulation: x * cos + rotate_half(x) * sin, angles repeated over both halves."
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)  # (T, hd) or (B, T, hd)
    cos, sin = emb.cos(), emb.sin()
    if positions.ndim == 2:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1).float() * sin).to(x.dtype)


# ---------------------------------------------------------------- token and position embeddings
def test_token_embeddings_equal_nn_embedding():
    emb = TokenEmbeddings(50, 8)
    ref = nn.Embedding(50, 8)
    ref.load_state_dict({"weight": emb.weight})
    ids = torch.randint(0, 50, (3, 7))
    out = emb(ids)
    assert out.shape == (3, 7, 8)
    assert torch.equal(out, ref(ids))
    assert torch.equal(out, F.embedding(ids, emb.embedding.weight))
    assert emb.weight is emb.embedding.weight
    assert list(emb.state_dict()) == ["embedding.weight"]


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[0, 50]]), "input_ids has id 50 >= vocab_size 50"),
    (torch.tensor([[-3, 1]]), "input_ids has id -3 < 0"),
    (torch.tensor([[0.0, 1.0]]), "input_ids must be an integer"),
    (torch.tensor([[True, False]]), "input_ids must be an integer"),
    (torch.tensor([1, 2]), "input_ids must have shape (B, T)"),
    (torch.zeros(1, 2, 3, dtype=torch.long), "input_ids must have shape (B, T)"),
])
def test_token_embeddings_errors(ids, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TokenEmbeddings(50, 8)(ids)


def test_positional_embeddings_equal_nn_embedding():
    pe = PositionalEmbeddings(32, 8)
    ref = nn.Embedding(32, 8)
    ref.load_state_dict({"weight": pe.embedding.weight})
    assert torch.equal(pe(torch.arange(10)), ref(torch.arange(10)))
    positions = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 1]])
    assert pe(positions).shape == (2, 4, 8)
    assert torch.equal(pe(positions), ref(positions))
    assert list(pe.state_dict()) == ["embedding.weight"]


@pytest.mark.parametrize("positions, message", [
    (torch.arange(33), "positions has position 32 >= max_position_embeddings 32"),
    (torch.tensor([-1]), "positions has position -1 < 0"),
    (torch.arange(4.0), "positions must be an integer"),
    (torch.zeros(1, 1, 4, dtype=torch.long), "positions must have shape"),
])
def test_positional_embeddings_errors(positions, message):
    with pytest.raises(ValueError, match=message):
        PositionalEmbeddings(32, 8)(positions)


def test_sinusoidal_embeddings_formula():
    num_positions, dim = 20, 12
    table = sinusoidal_embeddings(num_positions, dim)
    expected = torch.empty(num_positions, dim, dtype=torch.float64)
    for pos in range(num_positions):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            expected[pos, 2 * i], expected[pos, 2 * i + 1] = math.sin(angle), math.cos(angle)
    torch.testing.assert_close(table.double(), expected, atol=1e-6, rtol=0)
    similarity = table @ table.T
    torch.testing.assert_close(similarity[12, 5], similarity[9, 2])  # depends only on m - n
    with pytest.raises(ValueError, match="embed_dim"):
        sinusoidal_embeddings(4, 5)


# ---------------------------------------------------------------- RoPE
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rope_interleaved_equals_complex_reference(base):
    x = torch.randn(2, 3, 9, 32)
    positions = torch.arange(40, 49)
    torch.testing.assert_close(RoPE(32, 64, base=base, interleaved=True)(x, positions),
                               rope_complex_reference(x, positions, base), atol=1e-6, rtol=0)


def test_rope_half_split_equals_rotate_half_reference():
    x = torch.randn(2, 3, 9, 32)
    positions = torch.stack([torch.arange(9), torch.arange(100, 109)])  # (B, T) per-row positions
    torch.testing.assert_close(RoPE(32)(x, positions), rope_rotate_half_reference(x, positions), atol=1e-6, rtol=0)
    torch.testing.assert_close(RoPE(32, interleaved=True)(x, positions), rope_complex_reference(x, positions),
                               atol=1e-6, rtol=0)


def test_rope_matches_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128)
    hf_rope = LlamaRotaryEmbedding(config)
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    cos, sin = hf_rope(q, position_ids)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    rope = RoPE(16, 128, base=config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else 10000.0)
    torch.testing.assert_close(rope(q, position_ids), hf_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(rope(k, position_ids), hf_k, atol=1e-6, rtol=0)


def test_rope_layouts_differ_by_the_gguf_permutation():
    head_dim = 16
    perm = interleaved_to_half_split(head_dim)
    q, k = torch.randn(1, 2, 5, head_dim), torch.randn(1, 2, 5, head_dim)
    positions = torch.arange(3, 8)
    half_split, interleaved = RoPE(head_dim), RoPE(head_dim, interleaved=True)
    torch.testing.assert_close(half_split(q[..., perm], positions), interleaved(q, positions)[..., perm])
    scores_interleaved = interleaved(q, positions) @ interleaved(k, positions).transpose(-1, -2)
    scores_half_split = half_split(q[..., perm], positions) @ half_split(k[..., perm], positions).transpose(-1, -2)
    torch.testing.assert_close(scores_half_split, scores_interleaved, atol=1e-5, rtol=1e-5)
    # The same permutation applied to the rows of a per-head Q weight is llama.cpp's un-permute of HF weights.
    num_heads, embed_dim = 2, 2 * head_dim
    w_interleaved = torch.randn(num_heads * head_dim, embed_dim)
    w_half_split = w_interleaved.view(num_heads, head_dim // 2, 2, embed_dim).transpose(1, 2).reshape(-1, embed_dim)
    torch.testing.assert_close(w_half_split.view(num_heads, head_dim, embed_dim),
                               w_interleaved.view(num_heads, head_dim, embed_dim)[:, perm])


def test_rope_relative_positions_and_norms():
    rope = RoPE(64)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)

    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum()

    for shift in (1, 17, 500):
        torch.testing.assert_close(score(9 + shift, 4 + shift), score(9, 4), atol=1e-3, rtol=1e-4)
    assert not torch.allclose(score(9, 4), score(9, 5), atol=1e-3)
    x = torch.randn(2, 4, 20, 64)
    for interleaved in (False, True):
        out = RoPE(64, interleaved=interleaved)(x, torch.arange(300, 320))
        torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)


def test_rope_offset_chunk_equals_slice_of_full_rotation():
    rope = RoPE(16, 32)
    x = torch.randn(2, 2, 12, 16)
    full = rope(x, torch.arange(12))
    for start in (0, 5, 11):
        torch.testing.assert_close(rope(x[:, :, start:], torch.arange(start, 12)), full[:, :, start:], atol=1e-6, rtol=0)


def test_rope_auto_extends_table():
    small, big = RoPE(16, max_position_embeddings=4), RoPE(16, max_position_embeddings=5000)
    x = torch.randn(1, 1, 3, 16)
    positions = torch.tensor([2, 100, 4999])
    torch.testing.assert_close(small(x, positions), big(x, positions), atol=1e-6, rtol=0)
    assert small.max_position_embeddings >= 5000
    assert small.cos_cached.dtype == torch.float32
    assert len(small.state_dict()) == 0  # non-persistent buffers


def test_rope_dtype_and_frequencies():
    x = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    out = RoPE(8)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, rope_rotate_half_reference(x.float(), torch.arange(4)).bfloat16())
    torch.testing.assert_close(rope_frequencies(8), torch.tensor([10000.0 ** (-2 * i / 8) for i in range(4)]))
    cast = RoPE(8).to(torch.bfloat16)  # casting a model casts buffers; RoPE rebuilds its tables in fp32
    far = torch.arange(2000, 2004)
    assert torch.equal(cast(x, far), RoPE(8)(x, far))
    assert cast.cos_cached.dtype == torch.float32 and cast.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("make, message", [
    (lambda: RoPE(15), "head_dim must be a positive even number"),
    (lambda: RoPE(16)(torch.randn(1, 2, 3, 16), torch.tensor([0, -1, 2])), "positions must be >= 0"),
    (lambda: RoPE(16)(torch.randn(2, 3, 16)), "x must have shape"),
    (lambda: RoPE(16)(torch.randn(1, 2, 3, 8)), "expected head_dim 16"),
    (lambda: RoPE(16)(torch.randn(1, 2, 3, 16), torch.arange(3.0)), "positions must be an integer"),
    (lambda: RoPE(16)(torch.randn(1, 2, 3, 16), torch.arange(4)), "positions has shape"),
    (lambda: RoPE(16)(torch.randn(1, 2, 3, 16), torch.zeros(1, 1, 3, dtype=torch.long)), "positions must have shape"),
])
def test_rope_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------- RMSNorm
def test_rms_norm_equals_torch_rms_norm():
    ours, torchs = RMSNorm(48, eps=1e-6), nn.RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        torchs.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 48) * 7 + 1
    torch.testing.assert_close(ours(x), torchs(x), atol=1e-6, rtol=1e-6)
    assert list(ours.state_dict()) == ["weight"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_half_precision_like_hugging_face(dtype):
    norm = RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    x = (torch.randn(2, 3, 64) * 3).to(dtype)
    # Hugging Face LlamaRMSNorm.forward, written out
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = norm.weight * hidden.to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    assert torch.equal(out, expected)
    # large fp16 values whose squares overflow fp16 are handled (computed in fp32)
    big = torch.full((1, 64), 1000.0, dtype=dtype)
    assert torch.isfinite(norm(big)).all()


def test_rms_norm_matches_hugging_face_module():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    hf, ours = LlamaRMSNorm(32, eps=1e-6), RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(hf.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 4, 32).to(dtype)
        torch.testing.assert_close(ours.to(dtype)(x), hf.to(dtype)(x), atol=0, rtol=0)


def test_rms_norm_errors():
    with pytest.raises(ValueError, match="x has last dim 16, expected dim 32"):
        RMSNorm(32)(torch.randn(2, 16))
    with pytest.raises(ValueError, match="dim must be > 0"):
        RMSNorm(0)


# ---------------------------------------------------------------- activations
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_equals_torch(approximate):
    x = torch.randn(4, 100) * 4
    torch.testing.assert_close(GELU(approximate)(x), F.gelu(x, approximate=approximate), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(GELU(approximate)(x), nn.GELU(approximate=approximate)(x), atol=1e-6, rtol=1e-6)


def test_gelu_modes_differ_and_errors():
    x = torch.linspace(-4, 4, 801)
    difference = (GELU("tanh")(x) - GELU("none")(x)).abs().max()
    assert 1e-5 < difference < 1e-3
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        GELU("erf")


def test_gelu_tanh_is_gpt2_gelu_new():
    pytest.importorskip("transformers")
    from transformers.activations import NewGELUActivation
    x = torch.randn(1000) * 3
    torch.testing.assert_close(GELU("tanh")(x), NewGELUActivation()(x), atol=1e-6, rtol=1e-6)


def test_silu_equals_torch():
    x = torch.randn(4, 100) * 4
    torch.testing.assert_close(SiLU()(x), F.silu(x), atol=1e-6, rtol=1e-6)
    x_bf16 = x.bfloat16()
    assert SiLU()(x_bf16).dtype == torch.bfloat16


# ---------------------------------------------------------------- SwiGLU and the feed-forward layer
def test_swiglu_equals_torch_reference():
    embed_dim, hidden_dim = 24, 64
    swiglu = SwiGLU(embed_dim, hidden_dim)
    gate_proj, up_proj, down_proj = (nn.Linear(embed_dim, hidden_dim, bias=False),
                                     nn.Linear(embed_dim, hidden_dim, bias=False),
                                     nn.Linear(hidden_dim, embed_dim, bias=False))
    with torch.no_grad():
        gate_proj.weight.copy_(swiglu.gate_up_proj.weight[:hidden_dim])
        up_proj.weight.copy_(swiglu.gate_up_proj.weight[hidden_dim:])
        down_proj.weight.copy_(swiglu.down_proj.weight)
    x = torch.randn(2, 5, embed_dim)
    torch.testing.assert_close(swiglu(x), down_proj(F.silu(gate_proj(x)) * up_proj(x)), atol=1e-6, rtol=1e-5)
    assert sorted(swiglu.state_dict()) == ["down_proj.weight", "gate_up_proj.weight"]
    with pytest.raises(ValueError, match="expected embed_dim 24"):
        swiglu(torch.randn(2, 5, 12))


@pytest.mark.parametrize("embed_dim, multiple_of, multiplier, expected", [
    (4096, 256, None, 11008),  # LLaMA-7B
    (5120, 256, None, 13824),  # LLaMA-13B
    (8192, 4096, 1.3, 28672),  # LLaMA-2-70B
    (4096, 1024, 1.3, 14336),  # LLaMA-3-8B
    (48, 1, None, 128),
])
def test_swiglu_hidden_dim(embed_dim, multiple_of, multiplier, expected):
    assert swiglu_hidden_dim(embed_dim, multiple_of, multiplier) == expected


def test_swiglu_hidden_dim_errors():
    with pytest.raises(ValueError, match="multiple_of must be > 0"):
        swiglu_hidden_dim(64, multiple_of=0)
    with pytest.raises(ValueError, match="embed_dim must be > 0"):
        swiglu_hidden_dim(-1)


def test_feed_forward_equals_sequential():
    ffn = FeedForward(16)
    assert ffn.hidden_dim == 64 and isinstance(ffn.activation, GELU) and ffn.activation.approximate == "tanh"
    reference = nn.Sequential(nn.Linear(16, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 16), nn.Dropout(0.0))
    reference.load_state_dict({"0.weight": ffn.up_proj.weight, "0.bias": ffn.up_proj.bias,
                               "2.weight": ffn.down_proj.weight, "2.bias": ffn.down_proj.bias})
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(ffn(x), reference(x), atol=1e-6, rtol=1e-5)
    assert sorted(ffn.state_dict()) == ["down_proj.bias", "down_proj.weight", "up_proj.bias", "up_proj.weight"]
    relu_ffn = FeedForward(16, hidden_dim=20, activation=nn.ReLU(), bias=False)
    reference = nn.Sequential(nn.Linear(16, 20, bias=False), nn.ReLU(), nn.Linear(20, 16, bias=False))
    reference.load_state_dict({"0.weight": relu_ffn.up_proj.weight, "2.weight": relu_ffn.down_proj.weight})
    torch.testing.assert_close(relu_ffn(x), reference(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="x has last dim 8, expected embed_dim 16"):
        ffn(torch.randn(2, 8))
    with pytest.raises(ValueError, match="dropout must be in"):
        FeedForward(16, dropout=1.5)
