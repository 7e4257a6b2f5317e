"""The lean model core (issue 11) and the model/cache/generation cases of issue 10: configs with derived
defaults and named errors, one forward checked once (one device-to-host sync per decode step), one cache
object that refuses foreign caches and survives refused calls, and the generation arguments."""
import json

import pytest
import torch

from llm_book.core.config import CONFIG_KEYS, REQUIRED_KEYS, ModelConfig
from llm_book.core.kv_cache import KVCache
from llm_book.core.rope import RoPE
from llm_book.models.configs import count_parameters, get_config
from llm_book.models.gpt import GPT, GPT2
from llm_book.models.llama import Llama
from llm_book.models.mistral import Mistral

CLASSES = {"gpt": GPT, "gpt2": GPT2, "llama": Llama, "mistral": Mistral}
SEED_DICT = {"vocab_size": 320, "embed_dim": 64, "num_heads": 4, "num_layers": 2, "max_position_embeddings": 64,
             "dropout": 0.1}     # the seed's documented example, at a small size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids(batch_size, length, vocab_size=128, seed=1):
    return torch.randint(0, vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("arch", CLASSES)
def test_the_seed_example_builds_every_model(arch):
    "`Llama({vocab_size, embed_dim, num_heads, num_layers, max_position_embeddings, dropout})` works (it raised KeyError)."
    model = CLASSES[arch](SEED_DICT).eval()
    assert model(ids(1, 5, 320)).shape == (1, 5, 320)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(dict(SEED_DICT, architecture=arch))


def test_llama_hidden_size_is_derived_once():
    config = ModelConfig.from_dict({"vocab_size": 32000, "embed_dim": 4096, "num_heads": 32, "num_layers": 32,
                                    "max_position_embeddings": 2048}, "llama")
    assert (config.hidden_dim, config.head_dim, config.num_kv_heads) == (11008, 128, 32)


@pytest.mark.parametrize("arch", CLASSES)
@pytest.mark.parametrize("key", [k for k in CONFIG_KEYS if k not in REQUIRED_KEYS])
def test_every_optional_key_may_be_missing(arch, key):
    "A test builds each model from configs missing each optional key in turn: no KeyError/AttributeError."
    config = {k: v for k, v in get_config(f"{arch}-tiny").items() if k != key}
    model = CLASSES[arch](config).eval()
    logits, cache = model(ids(2, 6), use_cache=True)
    logits, cache = model(ids(2, 1), cache=cache)
    assert logits.shape == (2, 1, 128) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", CLASSES)
@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_a_missing_required_key_is_named(arch, key):
    config = {k: v for k, v in get_config(f"{arch}-tiny").items() if k != key}
    with pytest.raises(ValueError, match=f"config is missing \\['{key}'\\]"):
        CLASSES[arch](config)


@pytest.mark.parametrize("overrides, message", [
    (dict(norm_eps=-1), r"'norm_eps'\] must be a number > 0"),              # built a Llama with NaN logits
    (dict(norm_eps=0.0), r"'norm_eps'\] must be a number > 0"),
    (dict(dropout="0.1"), r"'dropout'\] must be a number in \[0, 1\), got '0.1'"),
    (dict(dropout=1.0), r"'dropout'\] must be a number in \[0, 1\)"),
    (dict(embed_dim=30), r"'embed_dim'\] 30 is not divisible by num_heads 4"),
    (dict(num_kv_heads=3), r"'num_heads'\] 4 is not divisible by num_kv_heads 3"),
    (dict(num_layers=0), r"'num_layers'\] must be a positive int"),
    (dict(vocab_size=True), r"'vocab_size'\] must be a positive int"),
    (dict(hidden_dim=64.0), r"'hidden_dim'\] must be a positive int"),
    (dict(num_layer=2), r"unknown key 'num_layer'; did you mean 'num_layers'"),
    (dict(window_size=4), r"llama has no sliding window"),
    (dict(tie_word_embeddings="yes"), r"'tie_word_embeddings'\] must be True or False"),
])
def test_bad_llama_configs_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        Llama({**get_config("llama-tiny"), **overrides})


@pytest.mark.parametrize("arch", ["gpt", "gpt2"])
@pytest.mark.parametrize("key, value", [("num_kv_heads", 2), ("window_size", 8), ("rope_base", 500.0), ("head_dim", 4)])
def test_gpt_refuses_keys_it_would_ignore(arch, key, value):
    "num_kv_heads / window_size given to GPT or GPT-2 were ignored (count_parameters then disagreed): refused by name."
    with pytest.raises(ValueError, match=f"'{key}'\\].*not supported by architecture '{arch}'"):
        CLASSES[arch]({**get_config(f"{arch}-tiny"), key: value})
    with pytest.raises(ValueError, match=f"'{key}'"):
        count_parameters({**get_config(f"{arch}-tiny"), key: value})


@pytest.mark.parametrize("arch", CLASSES)
def test_config_round_trips_through_json(arch):
    model = CLASSES[arch].from_preset(f"{arch}-tiny")
    saved = json.dumps(model.config.to_dict())
    again = CLASSES[arch](json.loads(saved))
    assert again.config == model.config and dict(again.config) == json.loads(saved)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_core_does_not_import_models():
    import pathlib, llm_book.core
    for path in pathlib.Path(llm_book.core.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "models" not in "".join(line for line in text.splitlines() if line.startswith(("from", "import"))), path


# ---------------------------------------------------------------- one forward, checked once
class SyncCounter:
    "Counts the Python calls that copy a tensor value to the host: item, tolist, bool, int, float."
    names = ("item", "tolist", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.names:
            original = getattr(torch.Tensor, name)
            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("arch, padded", [("llama", False), ("llama", True), ("mistral", False), ("gpt2", False)])
def test_a_cached_decode_step_makes_at_most_one_sync(arch, padded, monkeypatch):
    "One decode step of a 30-layer model: at most one device-to-host copy (the id-range check at the entrance)."
    model = CLASSES[arch].from_preset(f"{arch}-tiny", num_layers=30).eval()
    prompt = ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    if padded: mask[1, :4] = False
    with torch.inference_mode():
        _, cache = model(prompt, mask, use_cache=True)
        _, cache = model(ids(2, 1, seed=2), cache=cache)            # warm up: tables and buffers exist
        counter = SyncCounter(monkeypatch)
        _, cache = model(ids(2, 1, seed=3), cache=cache)
    assert len(counter.calls) <= 1, counter.calls


def test_rope_angles_are_computed_once_per_forward(monkeypatch):
    model = Llama.from_preset("llama-tiny", num_layers=6).eval()
    calls = []
    original = RoPE.cos_sin
    monkeypatch.setattr(RoPE, "cos_sin", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    model(ids(2, 7))
    assert len(calls) == 1


def test_the_model_forward_runs_no_per_layer_checks(monkeypatch):
    import llm_book.core.group_query_attention as gqa
    import llm_book.core.rope as rope
    def refuse(*args, **kwargs): raise AssertionError("a per-part check ran inside a model forward")
    for module, name in [(gqa, "check_hidden_states"), (gqa, "check_attention_mask"), (gqa, "check_positions"),
                         (rope, "_check_positions")]:
        monkeypatch.setattr(module, name, refuse)
    model = Llama.from_preset("llama-tiny").eval()
    mask = torch.tensor([[True] * 6, [False, False] + [True] * 4])
    logits, cache = model(ids(2, 6), mask, use_cache=True)
    model(ids(2, 1), cache=cache)


# ---------------------------------------------------------------- one cache object
def test_a_cache_from_another_model_with_equal_shapes_is_refused():
    "GPT-2 → LLaMA with the same KV shapes, and LLaMA A → LLaMA B, were accepted: now refused."
    llama_a = Llama.from_preset("llama-tiny", num_kv_heads=4).eval()      # 4 KV heads of 8, like gpt2-tiny
    llama_b = Llama.from_preset("llama-tiny", num_kv_heads=4).eval()
    gpt2 = GPT2.from_preset("gpt2-tiny").eval()
    _, gpt2_cache = gpt2(ids(1, 4), use_cache=True)
    _, cache_a = llama_a(ids(1, 4), use_cache=True)
    assert [K.shape for K, V in gpt2_cache] == [K.shape for K, V in cache_a]          # equal shapes
    for model, cache in [(llama_a, gpt2_cache), (llama_b, cache_a)]:
        with pytest.raises(ValueError, match="cache holds the keys and values of another model"):
            model(ids(1, 1), cache=cache)
    llama_a(ids(1, 1), cache=cache_a)                                                 # its own cache still works


def test_per_layer_caches_in_any_order_are_refused():
    "A list of per-layer caches (e.g. reversed) is not a cache: one object holds every layer, in order."
    model = Llama.from_preset("llama-tiny").eval()
    _, cache = model(ids(1, 4), use_cache=True)
    with pytest.raises(ValueError, match="cache must be one KVCache for all layers"):
        model(ids(1, 1), cache=[cache[1], cache[0]])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_a_refused_cached_call_leaves_the_cache_as_it_was(arch):
    "A cached call refused (too long, with a mask) advanced num_real (10 → 17), so the next legal call failed."
    model = CLASSES[arch].from_preset(f"{arch}-tiny").eval()
    prompt, mask = ids(2, 10), torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    _, cache = model(prompt, mask, use_cache=True)
    before = (cache.num_seen, cache.num_real.tolist())
    too_long = ids(2, 60, seed=2)
    if arch == "gpt2":     # learned positions: 64 at most
        with pytest.raises(ValueError, match="max_position_embeddings is 64"):
            model(too_long, torch.ones(2, 60, dtype=torch.bool), cache=cache)
    full = model.new_cache(max_length=12) if arch != "mistral" else None
    if full is not None:
        _, full = model(prompt, mask, cache=full)
        full_before = (full.num_seen, full.num_real.tolist())
        with pytest.raises(ValueError, match="cannot hold 13 tokens"):
            model(ids(2, 3), torch.ones(2, 3, dtype=torch.bool), cache=full)
        assert (full.num_seen, full.num_real.tolist()) == full_before
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(ids(2, 2), torch.ones(2, 5, dtype=torch.bool), cache=cache)
    assert (cache.num_seen, cache.num_real.tolist()) == before
    stepwise, cache = model(ids(2, 1, seed=5), cache=cache)            # the next legal call works...
    alone = model(torch.cat([prompt[1:, 3:], ids(2, 1, seed=5)[1:]], 1))[:, -1]
    torch.testing.assert_close(stepwise[1, -1], alone[0], atol=1e-5, rtol=0)    # ...with the right positions


def test_a_failure_inside_the_blocks_rolls_the_step_back(monkeypatch):
    model = Llama.from_preset("llama-tiny").eval()
    _, cache = model(ids(1, 5), use_cache=True)
    def broken(self, *args, **kwargs): raise RuntimeError("out of memory")
    monkeypatch.setattr(type(model.layers[1]), "forward", broken)
    with pytest.raises(RuntimeError):
        model(ids(1, 3), cache=cache)
    monkeypatch.undo()
    assert cache.num_seen == 5
    logits, _ = model(ids(1, 1, seed=3), cache=cache)
    whole = model(torch.cat([ids(1, 5), ids(1, 1, seed=3)], 1))[:, -1]
    torch.testing.assert_close(logits[:, -1], whole, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- generation arguments
@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int, got 2.5"),
    (dict(max_new_tokens=2, temperature=1.0, top_k=2.5), "top_k must be an int >= 1, got 2.5"),
    (dict(max_new_tokens=2, temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(max_new_tokens=2, top_p=0.9), "top_p only applies when sampling"),          # temperature=0 ignored top_p
    (dict(max_new_tokens=2, top_k=5), "top_k only applies when sampling"),
    (dict(max_new_tokens=2, temperature=1.0, top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(max_new_tokens=2, eos_token_id=128), r"eos_token_id must be an int id in \[0, vocab_size=128\)"),
])
def test_generation_arguments_are_named(kwargs, message):
    model = Llama.from_preset("llama-tiny").eval()
    with pytest.raises(ValueError, match=message):
        model.generate(ids(1, 3), **kwargs)


@pytest.mark.parametrize("arch", CLASSES)
def test_an_empty_batch_is_refused(arch):
    model = CLASSES[arch].from_preset(f"{arch}-tiny").eval()
    with pytest.raises(ValueError, match=r"B >= 1 and T >= 1, got \(0, 5\)"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"B >= 1 and T >= 1, got \(0, 5\)"):
        model.generate(torch.zeros(0, 5, dtype=torch.long), max_new_tokens=2)


def test_several_stop_ids():
    model = Llama.from_preset("llama-tiny").eval()
    greedy = model.generate(ids(1, 3), max_new_tokens=10)[0, 3:].tolist()
    first, second = greedy[2], greedy[4]
    stopped = model.generate(ids(1, 3), max_new_tokens=10, eos_token_id=[second, first])[0, 3:].tolist()
    assert stopped == greedy[:3]                                         # stops at the first of either id
