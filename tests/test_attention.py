"""Attention (chapters 01, 02, 07) against PyTorch's own implementations, plus masks, caches and bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llm_book.core.group_query_attention as gqa_module
from llm_book.core.group_query_attention import GroupQueryAttention, position_mask
from llm_book.core.head_attention import HeadAttention, causal_mask, padding_mask, scaled_dot_product_attention
from llm_book.core.kv_cache import KVCache, RollingKVCache
from llm_book.core.multi_head_attention import MultiHeadAttention, merge_heads, split_heads
from llm_book.core.rope import RoPE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    "These tensors are tiny: one thread is faster than two fighting over shared cores."
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def left_padded_mask(lengths, T):
    "(B, T) bool with the last `length` tokens of each row real."
    return torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]


def padded_positions(attention_mask):
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------- chapter 01: one head
def test_sdpa_matches_torch_with_random_masks():
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 5)
    mask = torch.rand(2, 1, 6, 9) > 0.5
    mask[0, 0, 2] = False                                            # one query that sees nothing
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=1e-5)
    assert torch.isfinite(out).all() and (out[0, :, 2] == 0).all()
    assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()
    row_sums = weights.sum(-1)[mask.any(-1).expand(2, 3, 6)]              # rows that see at least one key
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums))


def test_sdpa_unmasked_and_causal_match_torch():
    q, k, v = torch.randn(4, 7, 16), torch.randn(4, 7, 16), torch.randn(4, 7, 16)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v)[0], F.scaled_dot_product_attention(q, k, v),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, causal_mask(7))[0],
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=1e-5)


def test_causal_mask_shapes_and_alignment():
    assert torch.equal(causal_mask(5), torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(causal_mask(2, 5), torch.ones(5, 5, dtype=torch.bool).tril()[-2:])
    assert causal_mask(3, device="cpu").dtype == torch.bool


def test_padding_mask_broadcasts_over_queries():
    attention_mask = left_padded_mask([3, 5], 5)
    assert padding_mask(attention_mask).shape == (2, 1, 5)
    assert torch.equal((causal_mask(5) & padding_mask(attention_mask))[0, :, :2], torch.zeros(5, 2, dtype=torch.bool))


@pytest.mark.parametrize("causal", [True, False])
def test_head_attention_matches_torch(causal):
    head = HeadAttention(24, 8, causal=causal, bias=True)
    x = torch.randn(3, 6, 24)
    attention_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [False] * 2 + [True] * 4])
    with torch.no_grad():
        q, k, v = head.q_proj(x), head.k_proj(x), head.v_proj(x)
        torch.testing.assert_close(head(x), F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                   atol=1e-6, rtol=1e-5)
        mask = attention_mask[:, None, :] & (causal_mask(6) if causal else True)
        out = head(x, attention_mask)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_head_attention_padding_row_equals_row_alone():
    head = HeadAttention(16, 8)
    x = torch.randn(2, 7, 16)
    attention_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    with torch.no_grad():
        torch.testing.assert_close(head(x, attention_mask)[1, :5], head(x[1:, :5])[0], atol=1e-6, rtol=1e-5)


def test_head_attention_dropout_only_in_training():
    head = HeadAttention(16, 8, dropout=0.5)
    x = torch.randn(2, 7, 16)
    head.eval()
    torch.testing.assert_close(head(x), head(x))
    head.train()
    assert not torch.allclose(head(x), head(x))


# ---------------------------------------------------------------- chapter 02: multi-head
def test_split_merge_heads_round_trip():
    x = torch.randn(2, 5, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    assert torch.equal(heads[:, 2, :, :], x[:, :, 8:12])
    assert torch.equal(merge_heads(heads), x)


def copy_into_mha(mha, reference):
    with torch.no_grad():
        mha.qkv_proj.weight.copy_(reference.in_proj_weight)
        mha.qkv_proj.bias.copy_(reference.in_proj_bias)
        mha.out_proj.weight.copy_(reference.out_proj.weight)
        mha.out_proj.bias.copy_(reference.out_proj.bias)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_mha_matches_nn_multihead_attention(use_sdpa):
    reference = nn.MultiheadAttention(32, 4, bias=True, batch_first=True)
    mha = MultiHeadAttention(32, 4, use_sdpa=use_sdpa)
    copy_into_mha(mha, reference)
    x = torch.randn(3, 8, 32)
    right_padded = torch.tensor([[True] * 8, [True] * 5 + [False] * 3, [True] * 2 + [False] * 6])
    with torch.no_grad():
        expected, _ = reference(x, x, x, attn_mask=~causal_mask(8), need_weights=False)
        torch.testing.assert_close(mha(x), expected, atol=1e-5, rtol=1e-5)
        expected, _ = reference(x, x, x, attn_mask=~causal_mask(8), key_padding_mask=~right_padded,
                                need_weights=False)
        torch.testing.assert_close(mha(x, right_padded), expected, atol=1e-5, rtol=1e-5)
        mha.causal = False
        expected, _ = reference(x, x, x, key_padding_mask=~right_padded, need_weights=False)
        torch.testing.assert_close(mha(x, right_padded), expected, atol=1e-5, rtol=1e-5)


def test_mha_equals_loop_over_heads_and_explicit_path():
    mha = MultiHeadAttention(32, 4)
    x = torch.randn(2, 6, 32)
    attention_mask = left_padded_mask([6, 3], 6)
    heads = []
    for h in range(4):
        head = HeadAttention(32, 8, bias=True)
        for block, proj in enumerate((head.q_proj, head.k_proj, head.v_proj)):
            rows = slice(block * 32 + h * 8, block * 32 + (h + 1) * 8)
            proj.weight.data.copy_(mha.qkv_proj.weight[rows]); proj.bias.data.copy_(mha.qkv_proj.bias[rows])
        heads.append(head)
    with torch.no_grad():
        for mask in (None, attention_mask):
            fast = mha(x, mask)
            torch.testing.assert_close(mha.out_proj(torch.cat([h(x, mask) for h in heads], -1)), fast,
                                       atol=1e-5, rtol=1e-5)
            mha.use_sdpa = False
            torch.testing.assert_close(mha(x, mask), fast, atol=1e-5, rtol=1e-5)
            mha.use_sdpa = True
        assert torch.isfinite(fast).all()


# ---------------------------------------------------------------- chapter 07: grouped-query
def repeat_kv_reference(module, x, attention_mask=None, positions=None):
    "GQA the Hugging Face way: repeat_interleave the K/V heads, dense mask, torch SDPA per query head."
    B, T, _ = x.shape
    H, KVH, hd = module.num_heads, module.num_kv_heads, module.head_dim
    positions = torch.arange(T).expand(B, T) if positions is None else positions.expand(B, T)
    q, k, v = module.qkv_proj(x).split([H * hd, KVH * hd, KVH * hd], dim=-1)
    q, k, v = [t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v)]
    if module.rope is not None:
        q, k = module.rope(q, positions), module.rope(k, positions)
    k, v = k.repeat_interleave(H // KVH, dim=1), v.repeat_interleave(H // KVH, dim=1)
    distance = positions[:, :, None] - positions[:, None, :]
    mask = distance >= 0
    if module.window_size is not None:
        mask &= distance < module.window_size
    if attention_mask is not None:
        mask &= attention_mask[:, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    return module.out_proj(out.transpose(1, 2).reshape(B, T, H * hd))


@pytest.mark.parametrize("num_kv_heads", [8, 4, 2, 1])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_gqa_matches_repeated_kv_reference(num_kv_heads, use_sdpa):
    gqa = GroupQueryAttention(64, 8, num_kv_heads, bias=True, rope=RoPE(8), use_sdpa=use_sdpa)
    x = torch.randn(3, 10, 64)
    attention_mask = left_padded_mask([10, 7, 2], 10)
    positions = padded_positions(attention_mask)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), repeat_kv_reference(gqa, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gqa(x, attention_mask, positions),
                                   repeat_kv_reference(gqa, x, attention_mask, positions), atol=1e-5, rtol=1e-5)


def test_gqa_with_all_kv_heads_is_mha():
    mha, gqa = MultiHeadAttention(48, 6), GroupQueryAttention(48, 6, bias=True)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_gqa_explicit_head_dim():
    gqa = GroupQueryAttention(32, 4, 2, head_dim=16, rope=RoPE(16))
    assert gqa.qkv_proj.out_features == (4 + 4) * 16 and gqa.out_proj.in_features == 64
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), repeat_kv_reference(gqa, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_gqa_sliding_window_long_sequence(use_sdpa):
    gqa = GroupQueryAttention(32, 4, 2, rope=RoPE(8), window_size=5, use_sdpa=use_sdpa)
    x = torch.randn(2, 27, 32)
    attention_mask = left_padded_mask([27, 19], 27)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), repeat_kv_reference(gqa, x), atol=1e-5, rtol=1e-5)
        positions = padded_positions(attention_mask)
        torch.testing.assert_close(gqa(x, attention_mask, positions),
                                   repeat_kv_reference(gqa, x, attention_mask, positions), atol=1e-5, rtol=1e-5)


def run_in_chunks(module, x, chunk_sizes, cache, attention_mask=None, positions=None):
    outputs, start = [], 0
    for size in chunk_sizes:
        part = slice(start, start + size)
        outputs.append(module(x[:, part], None if attention_mask is None else attention_mask[:, part],
                              None if positions is None else positions[:, part], kv_cache=cache))
        start += size
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("chunks", [[1] * 16, [6, 1, 1, 5, 3], [16]])
def test_gqa_kv_cache_matches_full_forward(use_sdpa, chunks):
    gqa = GroupQueryAttention(32, 4, 2, rope=RoPE(8), use_sdpa=use_sdpa)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        full = gqa(x)
        cache = KVCache()
        torch.testing.assert_close(run_in_chunks(gqa, x, chunks, cache), full, atol=1e-5, rtol=1e-5)
    assert cache.num_seen == 16


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("chunks", [[1] * 20, [7, 1, 1, 9, 2], [3, 12, 5]])
def test_gqa_rolling_cache_matches_windowed_forward(use_sdpa, chunks):
    gqa = GroupQueryAttention(32, 4, 1, rope=RoPE(8), window_size=4, use_sdpa=use_sdpa)
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        full = gqa(x)
        torch.testing.assert_close(run_in_chunks(gqa, x, chunks, RollingKVCache(4)), full, atol=1e-5, rtol=1e-5)
        # a cache that keeps everything: the window must then come from the mask
        torch.testing.assert_close(run_in_chunks(gqa, x, chunks, KVCache()), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window_size", [None, 3])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_gqa_left_padding_rows_match_rows_alone(window_size, use_sdpa):
    gqa = GroupQueryAttention(32, 4, 2, rope=RoPE(8), window_size=window_size, use_sdpa=use_sdpa)
    lengths, T, prompt = [9, 5, 4, 3], 9, 6                             # all padding within the prompt
    x = torch.randn(4, T, 32)
    attention_mask = left_padded_mask(lengths, T)
    positions = padded_positions(attention_mask)
    with torch.no_grad():
        padded = gqa(x, attention_mask, positions)
        # prefill a padded prompt, then decode with no attention_mask: the cache remembers the padding
        cache = KVCache()
        prefill = gqa(x[:, :prompt], attention_mask[:, :prompt], positions[:, :prompt], kv_cache=cache)
        decoded = [gqa(x[:, t:t + 1], positions=positions[:, t:t + 1], kv_cache=cache) for t in range(prompt, T)]
        decoded = torch.cat([prefill] + decoded, dim=1)
        for row, length in enumerate(lengths):
            alone = gqa(x[row:row + 1, T - length:])[0]
            torch.testing.assert_close(padded[row, T - length:], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(decoded[row, T - length:], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded).all() and torch.isfinite(decoded).all()


def test_gqa_fully_padded_row_is_finite_and_paths_agree():
    gqa = GroupQueryAttention(32, 4, 2)
    x = torch.randn(2, 4, 32)
    attention_mask = torch.tensor([[True] * 4, [False] * 4])
    with torch.no_grad():
        fast = gqa(x, attention_mask)
        gqa.use_sdpa = False
        torch.testing.assert_close(gqa(x, attention_mask), fast, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(fast).all()


def test_position_mask_rule():
    query_positions = torch.tensor([[5, 6]])
    key_positions = torch.tensor([[4, 5, 6, 2, 3]])                  # rolling-buffer slot order
    key_mask = torch.tensor([[True, True, True, False, True]])
    mask = position_mask(query_positions, key_positions, key_mask, window_size=3)
    assert torch.equal(mask, torch.tensor([[[True, True, False, False, True], [True, True, True, False, False]]]))
    assert position_mask(torch.arange(3), torch.arange(3)).shape == (3, 3)


class SpySDPA:
    "Records the mask arguments the module hands to torch's SDPA."
    def __init__(self): self.calls, self.real = [], F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        self.calls.append((attn_mask, is_causal, kwargs.get("enable_gqa")))
        return self.real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)


def test_gqa_fast_path_builds_no_mask(monkeypatch):
    spy = SpySDPA()
    monkeypatch.setattr(gqa_module.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(gqa_module, "position_mask", lambda *args: pytest.fail("built a mask on the fast path"))
    gqa = GroupQueryAttention(32, 4, 2, rope=RoPE(8))
    cache = KVCache()
    with torch.no_grad():
        gqa(torch.randn(1, 6, 32))                                   # plain causal
        gqa(torch.randn(1, 6, 32), kv_cache=cache)                   # prefill into an empty cache
        gqa(torch.randn(1, 1, 32), kv_cache=cache)                   # decode one token
        GroupQueryAttention(32, 4, 2, window_size=8)(torch.randn(1, 6, 32))  # window covering the input
    assert spy.calls == [(None, True, True), (None, True, True), (None, False, True), (None, True, True)]


def test_gqa_dropout_only_in_training():
    gqa = GroupQueryAttention(32, 4, 2, dropout=0.5)
    x = torch.randn(2, 6, 32)
    gqa.eval()
    torch.testing.assert_close(gqa(x), gqa(x))
    gqa.train()
    assert not torch.allclose(gqa(x), gqa(x))


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_gqa_bfloat16(use_sdpa):
    gqa = GroupQueryAttention(32, 4, 2, rope=RoPE(8), use_sdpa=use_sdpa)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        expected = gqa(x)
        out = gqa.to(torch.bfloat16)(x.bfloat16(), left_padded_mask([6, 3], 6), padded_positions(left_padded_mask([6, 3], 6)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out[0].float(), expected[0], atol=0.05, rtol=0.05)


# ---------------------------------------------------------------- bad input
x16 = torch.randn(2, 5, 16)
BAD_CALLS = {
    "head x rank": (lambda: HeadAttention(16, 4)(torch.randn(5, 16)), "x must have shape"),
    "head x dim": (lambda: HeadAttention(16, 4)(torch.randn(2, 5, 8)), "expected embed_dim 16"),
    "head mask dtype": (lambda: HeadAttention(16, 4)(x16, torch.ones(2, 5)), "attention_mask must be a bool"),
    "head mask shape": (lambda: HeadAttention(16, 4)(x16, torch.ones(2, 6, dtype=torch.bool)),
                        "attention_mask has shape (2, 6)"),
    "mha heads": (lambda: MultiHeadAttention(16, 3), "num_heads 3 must divide embed_dim 16"),
    "mha x rank": (lambda: MultiHeadAttention(16, 4)(torch.randn(2, 3, 5, 16)), "x must have shape"),
    "mha x dim": (lambda: MultiHeadAttention(16, 4)(torch.randn(2, 5, 12)), "expected embed_dim 16"),
    "mha mask dtype": (lambda: MultiHeadAttention(16, 4)(x16, torch.ones(2, 5, dtype=torch.int64)),
                       "attention_mask must be a bool"),
    "mha mask shape": (lambda: MultiHeadAttention(16, 4)(x16, torch.ones(1, 5, dtype=torch.bool)),
                       "attention_mask has shape (1, 5)"),
    "split heads": (lambda: split_heads(x16, 3), "num_heads 3 must divide the feature size 16"),
    "gqa heads": (lambda: GroupQueryAttention(16, 3), "num_heads 3 must divide embed_dim 16"),
    "gqa kv heads": (lambda: GroupQueryAttention(16, 4, 3), "num_kv_heads 3 must divide num_heads 4"),
    "gqa zero kv heads": (lambda: GroupQueryAttention(16, 4, 0), "num_kv_heads 0 must divide num_heads 4"),
    "gqa window": (lambda: GroupQueryAttention(16, 4, window_size=0), "window_size must be >= 1"),
    "gqa x rank": (lambda: GroupQueryAttention(16, 4)(torch.randn(5, 16)), "x must have shape"),
    "gqa x dim": (lambda: GroupQueryAttention(16, 4)(torch.randn(2, 5, 8)), "expected embed_dim 16"),
    "gqa mask dtype": (lambda: GroupQueryAttention(16, 4)(x16, torch.ones(2, 5)), "attention_mask must be a bool"),
    "gqa mask shape": (lambda: GroupQueryAttention(16, 4)(x16, torch.ones(2, 4, dtype=torch.bool)),
                       "attention_mask has shape (2, 4)"),
    "gqa positions dtype": (lambda: GroupQueryAttention(16, 4)(x16, positions=torch.arange(5.0)),
                            "positions must be an integer"),
    "gqa positions shape": (lambda: GroupQueryAttention(16, 4)(x16, positions=torch.arange(10).view(2, 5)[:, :4]),
                            "positions has shape (2, 4)"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_value_error(name):
    call, message = BAD_CALLS[name]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def nan_for_empty_rows(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False):
    "Stands in for a fused GPU kernel that returns NaN for a query whose mask row is all False."
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                         enable_gqa=enable_gqa)
    return out if attn_mask is None else out.masked_fill(~attn_mask.any(-1, keepdim=True), float("nan"))


@pytest.mark.parametrize("module", ["mha", "gqa"])
def test_rows_that_see_nothing_are_zero_whatever_the_kernel(module, monkeypatch):
    import llm_book.core.multi_head_attention as mha_module
    target = mha_module if module == "mha" else gqa_module
    monkeypatch.setattr(target, "F", type("FakeF", (), {"scaled_dot_product_attention": staticmethod(nan_for_empty_rows)}))
    attention = MultiHeadAttention(32, 4) if module == "mha" else GroupQueryAttention(32, 4, 2)
    x = torch.randn(2, 5, 32)
    attention_mask = torch.tensor([[False, False, True, True, True], [False] * 5])   # row 1: only padding
    with torch.no_grad():
        fast = attention(x, attention_mask)
        attention.use_sdpa = False
        torch.testing.assert_close(fast, attention(x, attention_mask), atol=1e-6, rtol=1e-5)
    assert torch.isfinite(fast).all()
