"""Per-call cost of attention on the generation hot path (token-by-token decode at batch 1), as ratios.

Peers measured in the same run: a bare decode step (projections, RoPE, cache update, one SDPA call, no checks
and no mask) against `GroupQueryAttention` (fast path and explicit path), and SDPA vs the explicit formula for
a causal prefill of `MultiHeadAttention`. Absolute times depend on the machine; the ratios are the result.
"""
import time

import torch
import torch.nn.functional as F

from llm_book.core.group_query_attention import GroupQueryAttention
from llm_book.core.kv_cache import KVCache
from llm_book.core.multi_head_attention import MultiHeadAttention
from llm_book.core.rope import RoPE

torch.manual_seed(0)
torch.set_num_threads(1)
EMBED_DIM, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 576, 9, 3, 64      # one SmolLM2-135M layer
PROMPT, BLOCKS, BLOCK_STEPS = 128, 60, 10


def compare(steps, make_cache):
    """Seconds per decode step of each of `steps` (name -> step(x, cache)), after a PROMPT-token prefill.

    The peers take turns in short blocks and each keeps its fastest block: on a shared machine, the minimum is
    the measurement least disturbed by other processes."""
    caches = {name: make_cache() for name in steps}
    for name, step in steps.items():
        step(torch.randn(1, PROMPT, EMBED_DIM), caches[name])
    best = {name: float("inf") for name in steps}
    for _ in range(BLOCKS):
        tokens = torch.randn(BLOCK_STEPS, 1, 1, EMBED_DIM)
        for name, step in steps.items():
            start = time.perf_counter()
            for token in tokens:
                step(token, caches[name])
            best[name] = min(best[name], (time.perf_counter() - start) / BLOCK_STEPS)
    return best


def main():
    rope = RoPE(HEAD_DIM)
    attention = GroupQueryAttention(EMBED_DIM, NUM_HEADS, NUM_KV_HEADS, rope=rope).eval()
    explicit = GroupQueryAttention(EMBED_DIM, NUM_HEADS, NUM_KV_HEADS, rope=rope, use_sdpa=False).eval()
    explicit.load_state_dict(attention.state_dict())
    H, KVH, hd = NUM_HEADS, NUM_KV_HEADS, HEAD_DIM

    def bare_step(x, cache):
        B, T, _ = x.shape
        q, k, v = attention.qkv_proj(x).split([H * hd, KVH * hd, KVH * hd], dim=-1)
        q, k, v = q.view(B, T, H, hd).transpose(1, 2), k.view(B, T, KVH, hd).transpose(1, 2), v.view(B, T, KVH, hd).transpose(1, 2)
        positions = torch.arange(cache.num_seen, cache.num_seen + T)
        q, k = rope(q, positions), rope(k, positions)
        k, v, _, _ = cache.update(k, v, positions.expand(B, T), torch.ones(B, T, dtype=torch.bool))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        return attention.out_proj(out.transpose(1, 2).reshape(B, T, H * hd))

    with torch.no_grad():
        best = compare({"bare": bare_step, "fast": lambda x, cache: attention(x, kv_cache=cache),
                        "explicit": lambda x, cache: explicit(x, kv_cache=cache)}, lambda: KVCache(max_length=2048))
        print(f"decode step, batch 1, {PROMPT}+ cached tokens, one {EMBED_DIM}-wide layer ({H} heads, {KVH} kv heads):")
        print(f"  GroupQueryAttention (SDPA) / bare step      : {best['fast'] / best['bare']:.2f}x   "
              f"(bare {best['bare'] * 1e6:.0f} us)")
        print(f"  GroupQueryAttention (explicit) / bare step  : {best['explicit'] / best['bare']:.2f}x")

        mha = MultiHeadAttention(EMBED_DIM, NUM_HEADS).eval()
        x = torch.randn(4, 512, EMBED_DIM)
        times = {}
        for use_sdpa in (True, False):
            mha.use_sdpa = use_sdpa
            mha(x)
            start = time.perf_counter()
            for _ in range(3):
                mha(x)
            times[use_sdpa] = (time.perf_counter() - start) / 3
        print(f"causal prefill, MultiHeadAttention, 4 x 512 tokens: explicit / SDPA = {times[False] / times[True]:.2f}x")


if __name__ == "__main__":
    main()
