"""Speculative decoding (llm_book.speculative), batched generation and the compiled decode step (llm_book.batching),
and the engine pieces they rest on (KVCache.crop, next_token_probs): tiny models and SmolLM2."""
import copy
import warnings

import pytest
import torch

from llm_book.batching import column_major_weights, compile_decode, generate_batch, pad_left
from llm_book.core.generation import next_token_probs, sample_next_token
from llm_book.gguf import load_gguf, smollm2_path
from llm_book.models.configs import get_config
from llm_book.models.gpt import GPT2
from llm_book.models.llama import Llama
from llm_book.models.mistral import Mistral
from llm_book.speculative import (ModelDraft, PromptLookupDraft, SpeculationStats, accept_draft_tokens,
                                  chi_square_pvalue, speculative_generate, speculative_stream, truncated_model)

PROMPT = torch.tensor([[5, 9, 2, 7, 5, 9, 2, 7, 5, 9, 11]])


def tiny(name="llama-tiny", **overrides):
    "A tiny random model of the preset `name` in eval mode."
    cls = {"llama-tiny": Llama, "gpt2-tiny": GPT2, "mistral-tiny": Mistral}[name]
    return cls(get_config(name, **overrides)).eval()


@pytest.fixture(scope="module")
def smollm2():
    "fp32 SmolLM2-135M-Instruct and its tokenizer (loaded once)."
    return load_gguf(smollm2_path(), dtype=torch.float32)


# --- speculative decoding: greedy is unchanged -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("draft_kind", ["lookup", "small", "self", "truncated"])
@pytest.mark.parametrize("num_draft", [1, 4])
def test_speculative_greedy_equals_plain_greedy(name, draft_kind, num_draft):
    torch.manual_seed(0)
    model = tiny(name)
    small = tiny(name, num_layers=1, embed_dim=16, num_heads=2, hidden_dim=32,
                 **({"num_kv_heads": 1} if name == "llama-tiny" else {}))
    draft = {"lookup": None, "small": small, "self": model, "truncated": truncated_model(model, 1)}[draft_kind]
    plain = model.generate(PROMPT, max_new_tokens=30)
    stats = SpeculationStats()
    assert torch.equal(speculative_generate(model, PROMPT, 30, draft, num_draft, stats=stats), plain)
    assert stats.rounds + stats.accepted == 30                       # every round: the accepted guesses + 1
    if draft_kind == "self": assert stats.acceptance_rate == 1.0


def test_speculative_stream_stops_like_stream():
    torch.manual_seed(0)
    model = tiny()
    plain = model.generate(PROMPT, max_new_tokens=30)[0, PROMPT.shape[1]:].tolist()
    stop = plain[7]
    expected = [int(t) for t in model.stream(PROMPT, max_new_tokens=30, eos_token_id=[stop, 127])]
    got = [int(t) for t in speculative_stream(model, PROMPT, 30, tiny(num_layers=1), 3, eos_token_id=[stop, 127])]
    assert got == expected and got[-1] == stop


def test_speculative_greedy_equals_plain_smollm2(smollm2):
    "A short run of the real model: prompt lookup and a layer-skipping draft give plain greedy's tokens."
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer.apply_chat_template(
        [{"role": "user", "content": "Repeat exactly: red, green, blue, red, green, blue, red, green."}],
        add_generation_prompt=True)])
    plain = model.generate(ids, max_new_tokens=16)
    lookup_stats = SpeculationStats()
    assert torch.equal(speculative_generate(model, ids, 16, None, 4, stats=lookup_stats), plain)
    assert lookup_stats.accepted > 0                                 # the lookup did find something to copy
    assert torch.equal(speculative_generate(model, ids, 16, truncated_model(model, 10), 3), plain)


def test_draft_of_the_same_network_starts_from_the_target_cache(smollm2):
    """SmolLM2 in 4 bits drafting for float32: the draft takes over the target's keys of the prompt (no prefill of its
    own: its first forward feeds one token), and the tokens are plain greedy's, with or without sharing."""
    model, tokenizer = smollm2
    int4 = load_gguf(smollm2_path(), dtype="int4")[0]
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors."}],
                                                      add_generation_prompt=True)])
    plain = model.generate(ids, max_new_tokens=12)
    fed = []
    hook = int4.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
    shared, stats = ModelDraft(int4), SpeculationStats()
    try: assert torch.equal(speculative_generate(model, ids, 12, shared, 5, stats=stats), plain)
    finally: hook.remove()
    assert shared.shares_cache_with(model) and fed[0] == 1
    assert stats.acceptance_rate > 0.7                              # the int4 copy mostly guesses right
    assert torch.equal(speculative_generate(model, ids, 12, ModelDraft(int4, reuse_prompt_cache=False), 5), plain)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_lookup_in_front_of_a_model_draft(name):
    """A model draft checking prompt-lookup copies: greedy output is plain greedy's for any k; when sampling it steps one
    token at a time, so a seeded run draws exactly what the same draft without lookup draws."""
    torch.manual_seed(0)
    model = tiny(name)
    small = tiny(name, num_layers=1)
    plain = model.generate(PROMPT, max_new_tokens=30)
    for draft_model in (small, model):
        for num_draft in (1, 3, 8):
            draft = ModelDraft(draft_model, lookup=PromptLookupDraft(min_ngram=1))
            assert torch.equal(speculative_generate(model, PROMPT, 30, draft, num_draft), plain)
    sequence = model.generate(PROMPT, max_new_tokens=45)[0].tolist()
    alone, checking = ModelDraft(small), ModelDraft(small, lookup=PromptLookupDraft(min_ngram=1))
    for length in range(11, 50, 3):      # one draft across calls: its cache is cropped back to each new prefix
        assert checking.propose(sequence[:length], 6)[0] == alone.propose(sequence[:length], 6)[0]
    sampled = dict(temperature=0.8, top_k=20, seed=3)
    with_lookup = speculative_generate(model, PROMPT, 20, ModelDraft(small, lookup=PromptLookupDraft(min_ngram=1)), 4, **sampled)
    assert torch.equal(with_lookup, speculative_generate(model, PROMPT, 20, ModelDraft(small), 4, **sampled))


def test_rolling_cache_shared_with_a_draft():
    "A sliding-window model drafting for itself: the rolling cache is cloned; the tokens are plain greedy's."
    torch.manual_seed(0)
    model = tiny("mistral-tiny")                                     # window_size=8
    draft = ModelDraft(model)
    assert draft.shares_cache_with(model)
    assert torch.equal(speculative_generate(model, PROMPT[:, :3], 3, draft, 2), model.generate(PROMPT[:, :3], max_new_tokens=3))
    assert type(draft.cache).__name__ == "RollingKVCache"


# --- speculative decoding: sampling keeps the model's distribution -----------------------------------------------

def test_acceptance_rule_keeps_target_distribution():
    "Chi-square with a fixed seed: the first token out follows p for a poor model draft and a one-hot (lookup) draft."
    p = torch.tensor([0.10, 0.40, 0.05, 0.25, 0.20])
    q = torch.tensor([0.50, 0.05, 0.30, 0.05, 0.10])
    generator = torch.Generator().manual_seed(1)
    guesses = torch.multinomial(q, 10_000, replacement=True, generator=generator).tolist()
    first = [accept_draft_tokens(torch.stack([p, p]), [g], q[None], generator)[0] for g in guesses]
    assert chi_square_pvalue(torch.bincount(torch.tensor(first), minlength=5), p) > 0.01
    assert chi_square_pvalue(torch.bincount(torch.tensor(guesses), minlength=5), p) < 1e-6   # the test can fail
    lookup = [accept_draft_tokens(torch.stack([p, p]), [0], None, generator)[0] for _ in range(5_000)]
    assert chi_square_pvalue(torch.bincount(torch.tensor(lookup), minlength=5), p) > 0.01


def test_acceptance_rule_edge_cases():
    p = torch.tensor([0.0, 1.0, 0.0])
    assert accept_draft_tokens(torch.stack([p, p, p]), [1, 1], None) == [1, 1, 1]      # all accepted + bonus
    assert accept_draft_tokens(torch.stack([p, p]), [0], torch.tensor([[1.0, 0, 0]])) == [1]   # p(0)=0: rejected
    assert accept_draft_tokens(p[None], [], None) == [1]                               # no guesses: one sample


def test_next_token_probs_is_what_sample_next_token_draws_from():
    logits = torch.randn(3, 10)
    for kwargs in (dict(temperature=0.8), dict(temperature=1.3, top_k=4), dict(temperature=1.0, top_p=0.7)):
        probs = next_token_probs(logits, **kwargs)
        drawn = sample_next_token(logits, generator=torch.Generator().manual_seed(3), **kwargs)
        assert torch.equal(drawn, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))[:, 0])
    assert torch.equal(next_token_probs(logits, 0.0).argmax(-1), logits.argmax(-1))


# --- speculative decoding: bad input ------------------------------------------------------------------------------

def test_speculative_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="draft has vocab_size 64 but the model has 128"):
        speculative_generate(model, PROMPT, 5, tiny(vocab_size=64))
    with pytest.raises(ValueError, match="draft has vocab_size 64"):
        speculative_generate(model, PROMPT, 5, ModelDraft(tiny(vocab_size=64)))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_draft must be an int >= 1"):
            speculative_generate(model, PROMPT, 5, None, bad)
    with pytest.raises(ValueError, match="got batch size 2; use generate_batch"):
        speculative_generate(model, PROMPT.repeat(2, 1), 5)
    with pytest.raises(ValueError, match="draft must be None, a model or an object with propose"):
        speculative_generate(model, PROMPT, 5, "lookup")
    with pytest.raises(ValueError, match="top_k only applies when sampling"):
        speculative_generate(model, PROMPT, 5, top_k=3)
    with pytest.raises(ValueError, match="rolling cache \\(window_size=8\\) cannot"):
        speculative_generate(tiny("mistral-tiny"), PROMPT, 5)
    with pytest.raises(ValueError, match="num_layers must be an int in \\[1, 2\\]"):
        truncated_model(model, 0)
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        PromptLookupDraft(max_ngram=2, min_ngram=3)


def test_crop_with_left_padding_continues_like_no_guess():
    "Guessed tokens fed to a left-padded batch and cropped away leave the cache as if they were never fed."
    torch.manual_seed(0)
    model = tiny()
    ids, mask = pad_left([[3, 4, 5, 6], [7, 8]])
    cache = model.new_cache()
    model(ids, mask, cache=cache, use_cache=True)
    model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache, use_cache=True)          # guesses ...
    cache.crop(4)                                                                      # ... taken back
    fresh = model.new_cache()
    model(ids, mask, cache=fresh, use_cache=True)
    step = torch.tensor([[9], [10]])
    assert torch.allclose(model(step, cache=cache, use_cache=True)[0], model(step, cache=fresh, use_cache=True)[0],
                          atol=1e-6)
    assert torch.equal(cache.num_real, fresh.num_real)


# --- batched generation -----------------------------------------------------------------------------------------

def test_generate_batch_rows_equal_prompts_alone():
    torch.manual_seed(0)
    for model in (tiny(), tiny("gpt2-tiny")):
        prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [6, 5], [3, 5, 8], [9]]
        alone = [model.generate(torch.tensor([p]), max_new_tokens=10)[0, len(p):].tolist() for p in prompts]
        assert generate_batch(model, prompts, 10) == alone
        stop = alone[0][2]
        alone_stopped = [model.generate(torch.tensor([p]), max_new_tokens=10, eos_token_id=stop)[0, len(p):].tolist()
                         for p in prompts]
        assert generate_batch(model, prompts, 10, eos_token_id=stop) == alone_stopped


def test_generate_batch_smollm2(smollm2):
    model, tokenizer = smollm2
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("Hi!", "What is the capital of France? Answer in one word.", "Name a color.")]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=8)[0, len(p):].tolist() for p in prompts]
    assert generate_batch(model, prompts, 8) == alone


def test_generate_batch_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        generate_batch(model, [], 3)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty list of int token ids"):
        generate_batch(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="input_ids has id 300 >= vocab_size 128"):
        generate_batch(model, [[1, 300]], 3)
    with pytest.raises(ValueError, match="pad_id must be an int token id"):
        generate_batch(model, [[1, 2]], 3, pad_id=-1)


# --- the compiled decode step -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "mistral-tiny", "qwen3-tiny"])
def test_compiled_decode_agrees_with_eager(name):
    "compile_decode (opt-in): the decode step's graphs give eager's logits and tokens, batched and not; prefill stays eager."
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    if name == "qwen3-tiny":
        from llm_book.models.qwen3 import Qwen3
        model = Qwen3(get_config(name, num_layers=4)).eval()
    else:
        model = tiny(name, num_layers=4)
    compiled = compile_decode(copy.deepcopy(model))
    assert compiled.state_dict().keys() == model.state_dict().keys()      # nothing renamed, nothing added
    assert type(compiled.__dict__["run_blocks"]).__name__ == "CompiledDecode"
    graphs_before = counters["stats"]["unique_graphs"]
    assert torch.equal(compiled.generate(PROMPT, max_new_tokens=10), model.generate(PROMPT, max_new_tokens=10))
    assert counters["stats"]["unique_graphs"] - graphs_before == 1         # one step: the 4 blocks one compiled region
    longer = 80 if name != "gpt2-tiny" else 50                            # (GPT-2 tiny holds 64 positions)
    assert torch.equal(compiled.generate(PROMPT, max_new_tokens=longer), model.generate(PROMPT, max_new_tokens=longer))
    assert counters["stats"]["unique_graphs"] - graphs_before == 1         # a grown cache (past 64 slots): same graph
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    assert generate_batch(compiled, prompts, 6) == generate_batch(model, prompts, 6)
    with torch.no_grad():
        assert torch.allclose(compiled(PROMPT), model(PROMPT), atol=1e-5)            # prefill: the eager code
        _, cache = compiled(PROMPT, use_cache=True)
        _, reference_cache = model(PROMPT, use_cache=True)
        step = compiled(PROMPT[:, -1:], cache=cache)[0]                                # one token: the graph
        assert torch.allclose(step, model(PROMPT[:, -1:], cache=reference_cache)[0], atol=1e-5)
    compiled.train()                                                                   # training: eager, gradients flow
    compiled(PROMPT[:, :1]).sum().backward()
    assert compiled.layers[0].feed_forward.down_proj.weight.grad is not None
    compile_decode(compiled, enable=False)
    assert "run_blocks" not in compiled.__dict__


def test_compiled_decode_moe_block_by_block():
    "A mixture of experts cannot be one traced region (data-dependent routing): said once, then compiled block by block."
    from llm_book.models.mixtral import Mixtral
    torch.manual_seed(0)
    model = Mixtral(get_config("mixtral-tiny")).eval()
    compiled = compile_decode(copy.deepcopy(model))
    with pytest.warns(UserWarning, match="cannot be traced as one region.*each block on its own"):
        tokens = compiled.generate(PROMPT, max_new_tokens=12)
    assert torch.equal(tokens, model.generate(PROMPT, max_new_tokens=12))
    assert "block" in compiled.__dict__["_decode_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # said once, not per step or per call
        assert generate_batch(compiled, [[3, 1, 4], [9, 2]], 6) == generate_batch(model, [[3, 1, 4], [9, 2]], 6)


def test_compiled_decode_refuses_foreign_keys():
    "A cache whose keys do not fit the model (another dtype) gets the eager step's clear error, not a tracing error."
    torch.manual_seed(0)
    model = compile_decode(tiny("llama-tiny", num_layers=2))
    with torch.no_grad():
        _, cache = model(PROMPT, use_cache=True)
        half = cache.clone(dtype=torch.float16)                            # owned by no model: passes check_cache
        with pytest.raises(ValueError, match="was it made for another model or layer"):
            model(PROMPT[:, -1:], cache=half)


def test_compiled_decode_bad_input():
    with pytest.raises(ValueError, match="compile_decode needs a model of the book"):
        compile_decode(torch.nn.Linear(2, 2))
    from llm_book.models.gemma3 import Gemma3
    with pytest.raises(ValueError, match="compile_decode compiles CachedDecoder blocks.*Gemma3"):
        compile_decode(Gemma3(get_config("gemma3-tiny")))


def test_compiled_decode_needs_a_compiler(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="compile_decode needs a C\\+\\+ compiler"):
        compile_decode(tiny())


def _decode_logits(model, sequence, prompt_length):
    "Teacher-forced last-position logits: the prompt's, then one decode step per token of `sequence` after it. (steps, V)"
    with torch.inference_mode():
        logits, cache = model(sequence[:, :prompt_length], use_cache=True)
        rows = [logits[0, -1]]
        for t in range(prompt_length, sequence.shape[1]):
            logits, cache = model(sequence[:, t:t + 1], cache=cache)
            rows.append(logits[0, -1])
    return torch.stack(rows)


def test_compiled_decode_int4_smollm2(smollm2):
    """The benchmarks' int4 SmolLM2 compiled, on the same inputs as eager: its logits move less than int4 itself moves
    them from float32, and its choice is eager's wherever eager's best two logits are not a near-tie.

    Not token for token over a long run: the int4 kernel rounds activations to bfloat16 and the head to int8, so
    a float32-rounding difference (inductor sums the norm in another order) can flip one rounding; at a near-tie the
    greedy paths then part, as they would for any two correct implementations."""
    reference, tokenizer = smollm2
    model = load_gguf(smollm2_path(), dtype="int4")[0]
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors."}],
                                                      add_generation_prompt=True)])
    sequence = model.generate(ids, max_new_tokens=24)                           # eager int4's own greedy run
    eager = _decode_logits(model, sequence, ids.shape[1])
    compiled = _decode_logits(compile_decode(copy.deepcopy(model)), sequence, ids.shape[1])
    exact = _decode_logits(reference, sequence, ids.shape[1])
    assert (compiled - eager).abs().max() <= (eager - exact).abs().max()
    best_two = eager.topk(2, dim=-1).values
    clear = best_two[:, 0] - best_two[:, 1] > 0.1                               # not a near-tie
    assert clear.sum() >= 15
    assert torch.equal(compiled.argmax(-1)[clear], eager.argmax(-1)[clear])
    target = load_gguf(smollm2_path(), dtype="int8")[0]                         # a compiled draft: target's tokens
    draft = compile_decode(model)
    assert torch.equal(speculative_generate(target, ids, 16, draft, 6), target.generate(ids, max_new_tokens=16))


# --- column-major weights (opt-in layout for products of a few rows) -------------------------------------------

@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_column_major_weights_keep_the_engine_guarantees(name):
    "Same values, logits to float32 rounding; speculative = plain greedy and batch = alone hold in the new layout."
    torch.manual_seed(0)
    model = tiny(name)
    reference = copy.deepcopy(model)
    column_major_weights(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    for (key, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), key
    with torch.no_grad():
        assert torch.allclose(model(PROMPT), reference(PROMPT), atol=1e-5)
    plain = model.generate(PROMPT, max_new_tokens=20)
    assert torch.equal(speculative_generate(model, PROMPT, 20, tiny(name, num_layers=1), 4), plain)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [6, 5], [3, 5, 8]]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=8)[0, len(p):].tolist() for p in prompts]
    assert generate_batch(model, prompts, 8) == alone
    fresh = tiny(name)                                          # its state_dict loads into a row-major model
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(PROMPT), reference(PROMPT), atol=1e-5)
    column_major_weights(model, enable=False)
    assert all(m.weight.is_contiguous() for m in linears)
    with pytest.raises(TypeError, match="needs an nn.Module"):
        column_major_weights("model")


def test_column_major_weights_smollm2(smollm2):
    "The real model in the benchmarks' layout: logits near the default layout's, speculative and batched tokens unchanged."
    model, tokenizer = smollm2
    column = column_major_weights(copy.deepcopy(model))
    assert column.lm_head.weight is column.token_embeddings.weight      # the tied matrix stays one
    ids = torch.tensor([tokenizer.apply_chat_template(
        [{"role": "user", "content": "Repeat exactly: red, green, blue, red, green, blue."}], add_generation_prompt=True)])
    with torch.no_grad():
        assert (column(ids) - model(ids)).abs().max() < 1e-3             # float32 rounding over 30 layers
    plain = column.generate(ids, max_new_tokens=12)
    assert torch.equal(speculative_generate(column, ids, 12, truncated_model(column, 10), 4), plain)
    prompts = [ids[0].tolist(), tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}],
                                                              add_generation_prompt=True)]
    alone = [column.generate(torch.tensor([p]), max_new_tokens=8)[0, len(p):].tolist() for p in prompts]
    assert generate_batch(column, prompts, 8) == alone
