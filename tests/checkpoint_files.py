"""Helpers for tests that damage checkpoint files on purpose (used by test_training.py and test_cli.py)."""
import json


def tensor_byte_range(path, name):
    "Where tensor `name`'s buffer lies in the safetensors file `path` (8-byte header length, JSON header, buffers)."
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + header_size])[name]["data_offsets"]
    return 8 + header_size + start, 8 + header_size + end


def rewrite_checkpoint(path, out, metadata_change=None, byte_change=None, name="model.qkv_proj.weight"):
    "A copy of checkpoint `path` at `out` with its metadata changed, or with `byte_change(raw, start, end)` applied to a tensor."
    if metadata_change is not None:
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        save_file(tensors, str(out), metadata=metadata_change(dict(metadata)))
    else:
        raw = bytearray(path.read_bytes())
        byte_change(raw, *tensor_byte_range(path, name))
        out.write_bytes(bytes(raw))
    return out
