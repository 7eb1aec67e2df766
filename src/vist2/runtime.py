"""Facts every entry point needs about a checkpoint and the machine it runs on, stated once.

    >>> from vist2.runtime import load_checkpoint, eos_ids, kv_geometry
    >>> model, processor = load_checkpoint("runs/tiny", device="cpu", dtype="float32")  # doctest: +SKIP
    >>> eos_ids(model.config.text_config, processor.tokenizer)                           # doctest: +SKIP
    [151645, 151643]
    >>> kv_geometry(model.config.text_config)                                             # doctest: +SKIP
    KVGeometry(layers=2, kv_heads=2, head_dim=16)

Stdlib only at import (torch is imported where it is used), so the command line stays quick
to start and a standalone script may load this file alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def is_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a transformers checkpoint (a ``config.json``), as a VIST2 folder does."""
    return (Path(folder) / "config.json").is_file()


def require_checkpoint(folder: str | Path, flag: str = "--model", error: type[Exception] = ValueError) -> Path:
    """``folder`` as a Path, or ``error`` naming ``flag`` when it is not a VIST2 checkpoint folder.

        >>> require_checkpoint("no/such/folder")
        Traceback (most recent call last):
        ...
        ValueError: --model no/such/folder: not a VIST2 checkpoint folder (no config.json)
    """
    if not is_checkpoint(folder):
        raise error(f"{flag} {folder}: not a VIST2 checkpoint folder (no config.json)")
    return Path(folder)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded, as one line naming the file and what is wrong with it."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _check_json_files(folder: Path) -> None:
    for path in sorted(folder.glob("*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)}); the file is damaged") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")


def _check_weights(folder: Path) -> Path:
    """The weights file, its header read (safetensors: the header and that the data covers the file),
    without loading a tensor."""
    path = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder}: no weights file ({' or '.join(WEIGHT_FILES)})")
    if path.name == "pytorch_model.bin":
        return path
    from safetensors import safe_open

    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
    else:
        files = [path]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {path.name})")
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError and whatever a damaged file raises
            raise CheckpointError(f"{f}: not a readable safetensors file ({_one_line(e)}); "
                                  "it is truncated or damaged, copy it again") from None
    return path


def torch_dtype(dtype: Any):
    """A ``torch.dtype`` from one of :data:`DTYPE_NAMES` (a ``torch.dtype`` passes through);
    ``ValueError`` for any other name."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype {dtype}: choose from {', '.join(DTYPE_NAMES)}")
    return getattr(torch, dtype)


def cast_model(model, dtype):
    """``model.to(dtype)`` that keeps the rotary embeddings' ``inv_freq`` buffers in float32, as
    ``from_pretrained(dtype=...)`` does: rounded to bf16 they shift a position's angle, by 0.69
    radians at position 4,000, so a model built in fp32 and cast would attend with drifted positions."""
    keep = {name: buf.detach().clone() for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    model.to(dtype)
    for name, buf in keep.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buf.to(model.get_buffer(name).device))
    return model


def default_device(device: str | None = None) -> str:
    """``device`` when given, else ``"cuda"`` where CUDA is available and ``"cpu"`` otherwise."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_checkpoint(folder: str | Path, device: str | None = None, dtype: Any = "float32"):
    """``(model, processor)`` from a VIST2 checkpoint folder: weights in ``dtype`` on ``device``
    (default: :func:`default_device`), in eval mode.

    The one loader every command goes through. A folder that is not a checkpoint, or a damaged one
    (a JSON file that does not parse, a config field of the wrong type or value, no weights file, a
    truncated or garbled safetensors file, tokenizer files that do not load), raises
    :class:`CheckpointError` (a ``ValueError``): one line naming the file and what is wrong.
    """
    from .config import VIST2Config
    from .modeling import VIST2ForCausalLM
    from .processing import VIST2Processor

    folder = require_checkpoint(folder, error=CheckpointError)
    dtype = torch_dtype(dtype)
    _check_json_files(folder)
    try:
        config = VIST2Config.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - a wrong-typed or out-of-range field, whatever raises it
        raise CheckpointError(f"{folder / 'config.json'}: {_one_line(e)}") from e
    weights = _check_weights(folder)
    try:
        model = VIST2ForCausalLM.from_pretrained(str(folder), config=config, dtype=dtype)
    except (TypeError, AttributeError, KeyError) as e:  # the model's shapes come from config.json
        raise CheckpointError(f"{folder / 'config.json'}: cannot build the model ({type(e).__name__}: "
                              f"{_one_line(e)})") from e
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{weights}: cannot load the weights ({type(e).__name__}: {_one_line(e)})") from e
    try:
        processor = VIST2Processor.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{folder}: cannot load the tokenizer/processor files (tokenizer.json, "
                              f"processor_config.json): {type(e).__name__}: {_one_line(e)}") from e
    return model.to(default_device(device)).eval(), processor


def eos_ids(text_config, tokenizer=None) -> list[int]:
    """Every id that ends a sequence: the tokenizer's EOS first, then the LLM config's
    ``eos_token_id`` (an int or a list), without repeats or ``None``. Generation stops at any of
    them; where one id is needed (a pad or prefix token) take the first.

        >>> from types import SimpleNamespace as NS
        >>> eos_ids(NS(eos_token_id=[151645, 151643]), NS(eos_token_id=151643))
        [151643, 151645]
    """
    from_config = text_config.eos_token_id
    if not isinstance(from_config, (list, tuple)):
        from_config = [from_config]
    first = getattr(tokenizer, "eos_token_id", None)
    return list(dict.fromkeys(e for e in (first, *from_config) if e is not None))


class KVGeometry(NamedTuple):
    """The shape of one KV-cache entry: ``layers`` x (K and V) x ``kv_heads`` x ``head_dim``."""

    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_entry(self, element_size: int) -> int:
        """Bytes one cached token takes across all layers (keys and values)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * element_size


def kv_geometry(text_config) -> KVGeometry:
    """The KV geometry of an LLM config; ``head_dim`` and ``num_key_value_heads`` default the way
    transformers does (``hidden_size / heads``; as many KV heads as query heads)."""
    tc = text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    return KVGeometry(tc.num_hidden_layers, kv_heads, head_dim)


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as JSON (UTF-8, indented) through a temporary file, an fsync and a rename:
    a reader sees the old file or the whole new one, never half of it. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
