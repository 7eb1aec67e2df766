"""vist2.runtime: checkpoint folders, dtype names, device choice, EOS ids, KV geometry, JSON writes."""

import json
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from vist2.checks import is_int
from vist2.engine import Engine
from vist2.errors import CLIError
from vist2.runtime import (DTYPE_NAMES, KVGeometry, cast_model, default_device, eos_ids, is_checkpoint, kv_geometry,
                           load_checkpoint, require_checkpoint, torch_dtype, write_json)


def test_checkpoint_folder_is_one_with_config_json(tmp_path, tiny_dir):
    assert is_checkpoint(tiny_dir)
    assert not is_checkpoint(tmp_path)
    assert not is_checkpoint(tmp_path / "missing")
    assert require_checkpoint(str(tiny_dir)) == tiny_dir
    with pytest.raises(ValueError, match=rf"^--model {tmp_path}: not a VIST2 checkpoint folder \(no config.json\)$"):
        require_checkpoint(tmp_path)
    with pytest.raises(CLIError, match=r"^--from .*: not a VIST2"):
        require_checkpoint(tmp_path, flag="--from", error=CLIError)


def test_dtype_names():
    assert [torch_dtype(n) for n in DTYPE_NAMES] == [torch.float32, torch.bfloat16, torch.float16]
    assert torch_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="--dtype float64: choose from float32, bfloat16, float16"):
        torch_dtype("float64")


def test_default_device():
    assert default_device("cuda:1") == "cuda:1"
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_eos_ids_keep_every_id_tokenizer_first():
    assert eos_ids(NS(eos_token_id=151645)) == [151645]
    assert eos_ids(NS(eos_token_id=[151645, 151643]), NS(eos_token_id=151643)) == [151643, 151645]
    assert eos_ids(NS(eos_token_id=(7, 8)), NS(eos_token_id=9)) == [9, 7, 8]
    assert eos_ids(NS(eos_token_id=None), NS(eos_token_id=None)) == []
    assert eos_ids(NS(eos_token_id=[None, 5]), None) == [5]


def test_engine_stops_at_every_eos_id(tiny_dir):
    """A second EOS id in the LLM config stops generation like the tokenizer's own."""
    from vist2.engine import SamplingParams

    model, processor = load_checkpoint(tiny_dir, "cpu")
    params = SamplingParams(max_new_tokens=6, no_repeat_ngram_size=1)  # greedy, every token new
    free = Engine(model, processor, max_batch=1).generate_text(["Once upon a time"], params)[0]
    assert free.stats.finish_reason == "length" and len(free.token_ids) == 6
    third = free.token_ids[2]  # the same greedy run reaches it again, as its first stop
    assert third not in free.token_ids[:2] and third not in eos_ids(model.config.text_config, processor.tokenizer)
    model.config.text_config.eos_token_id = [151645, third]
    engine = Engine(model, processor, max_batch=1)
    assert engine.eos == eos_ids(model.config.text_config, processor.tokenizer)
    assert third in engine.eos and processor.tokenizer.eos_token_id in engine.eos
    stopped = engine.generate_text(["Once upon a time"], params)[0]
    assert stopped.stats.finish_reason == "eos"
    assert stopped.token_ids[:2] == free.token_ids[:2] and len(stopped.token_ids) <= 3


def test_kv_geometry_defaults_like_transformers():
    qwen = NS(num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_size=1024)
    assert kv_geometry(qwen) == KVGeometry(28, 8, 128)
    # 28 layers x (K, V) x 8 heads x 128 dims x 2 bytes (bf16)
    assert kv_geometry(qwen).bytes_per_entry(2) == 28 * 2 * 8 * 128 * 2 == 114688
    plain = NS(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    assert kv_geometry(plain) == KVGeometry(2, 4, 16)


def test_kv_geometry_matches_the_engine_cache(tiny_dir):
    model, processor = load_checkpoint(tiny_dir, "cpu")
    engine = Engine(model, processor, max_batch=1)
    g = kv_geometry(model.config.text_config)
    assert engine.runner.cache.bytes_per_token == g.bytes_per_entry(4)
    assert engine.runner.cache.keys[0].shape[1:4:2] == (g.kv_heads, g.head_dim)


def test_load_checkpoint_dtype_device_eval(tiny_dir, tmp_path):
    model, processor = load_checkpoint(tiny_dir, "cpu", "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and model.device.type == "cpu"
    assert not model.training
    assert processor.tokenizer is not None
    with pytest.raises(ValueError, match="not a VIST2 checkpoint folder"):
        load_checkpoint(tmp_path)


def test_is_int():
    assert is_int(3) and is_int(np.int64(3)) and is_int(-1)
    assert not any(is_int(v) for v in (True, np.bool_(True), 3.0, "3", None))


def test_write_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "sub" / "r.json"
    assert write_json(path, {"b": 1, "a": "红楼梦"}) == path
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"b": 1, "a": "红楼梦"}
    assert "红楼梦" in text  # UTF-8, not \\u escapes
    assert list(json.loads(text)) == ["b", "a"]  # key order kept
    write_json(path, [1])
    assert json.loads(path.read_text()) == [1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temporary file left behind


def _damage(folder, case: str) -> str:
    """Damage a copy of a checkpoint folder one way; returns the file the error must name."""
    weights = folder / "model.safetensors"
    if case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 1000])
        return "model.safetensors: not a readable safetensors file"
    if case == "random bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(4096))
        return "model.safetensors: not a readable safetensors file"
    if case == "empty weights":
        weights.write_bytes(b"")
        return "model.safetensors: not a readable safetensors file"
    if case == "no weights":
        weights.unlink()
        return f"{folder}: no weights file (model.safetensors"
    if case == "invalid json":
        (folder / "config.json").write_text('{"model_type": "vist2",', encoding="utf-8")
        return "config.json: not valid JSON"
    if case == "json not an object":
        (folder / "config.json").write_text("[1, 2]", encoding="utf-8")
        return "config.json: expected a JSON object"
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if case == "wrong-typed field":
        cfg["chunk_tokens"] = "64"
    else:  # a wrong-typed field of the LLM's config
        cfg["text_config"]["hidden_size"] = "64"
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return "config.json: "


DAMAGES = ["truncated", "random bytes", "empty weights", "no weights", "invalid json", "json not an object",
           "wrong-typed field", "wrong-typed LLM field"]


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_folder_is_one_line_naming_the_file(tiny_dir, tmp_path, case):
    import shutil

    from vist2.runtime import CheckpointError

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    needle = _damage(folder, case)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder)
    message = str(e.value)
    assert needle in message and "\n" not in message and len(message) < 400, message
    assert isinstance(e.value, ValueError)  # every command already turns ValueError into its one-line exit 2


@pytest.mark.parametrize("case", ["truncated", "invalid json", "wrong-typed field", "no weights"])
def test_generate_and_eval_exit_2_on_a_damaged_folder(tiny_dir, tmp_path, capsys, case):
    import shutil

    from vist2.cli import main

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    needle = _damage(folder, case)
    docs = tmp_path / "docs.txt"
    docs.write_text("some text " * 50, encoding="utf-8")
    for argv in (["generate", "--model", str(folder), "--prompt", "hi"],
                 ["eval", "olm", "--model", str(folder), "--data", str(docs), "--out", str(tmp_path / "o.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vist2: error: ") and needle in err and len(err.strip().splitlines()) == 1, err


def test_cast_model_keeps_rotary_frequencies_in_float32(tiny_dir):
    """A model cast to bf16 with plain ``.to`` rounds RoPE's inv_freq and drifts every position's angle;
    ``cast_model`` keeps them as ``from_pretrained(dtype=bf16)`` loads them (the reference here)."""
    loaded, _ = load_checkpoint(tiny_dir, "cpu", "bfloat16")
    freqs = {n: b for n, b in loaded.named_buffers() if n.endswith("inv_freq")}
    assert freqs and all(b.dtype == torch.float32 for b in freqs.values())
    fp32, _ = load_checkpoint(tiny_dir, "cpu", "float32")
    plain = {n: b for n, b in fp32.to(torch.bfloat16).named_buffers() if n.endswith("inv_freq")}
    assert any(not torch.equal(plain[n].float(), freqs[n]) for n in freqs)  # the drift cast_model prevents
    fp32, _ = load_checkpoint(tiny_dir, "cpu", "float32")
    cast = cast_model(fp32, torch.bfloat16)
    assert next(cast.parameters()).dtype == torch.bfloat16
    for n, b in cast.named_buffers():
        if n.endswith("inv_freq"):
            assert b.dtype == torch.float32 and torch.equal(b, freqs[n]), n
