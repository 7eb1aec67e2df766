"""Train a small byte-level BPE tokenizer for a VIST2 model built from scratch.

A 151,936-word Qwen3 vocabulary makes the LM head most of a small model's compute and
parameters; a model trained from scratch can use a vocabulary of a few thousand words.
The tokenizer keeps what the stages and the engine rely on:

- byte-level BPE (HF ``tokenizers``), so any text — Chinese, newlines, runs of spaces —
  encodes and decodes back exactly, and a chunk boundary may split a character
  (:mod:`vist2.text` carries the bytes);
- ``<|endoftext|>`` (ends an OLM document, pads), ``<|im_start|>`` / ``<|im_end|>``
  (chat turns; ``<|im_end|>`` is the EOS generation stops on), ``<think>`` / ``</think>``
  (SFT replies), each a single id;
- a ChatML chat template that keeps the user's message verbatim
  (:func:`vist2.chat.chat_prompt` splits the prompt around it).

It reads the same sources as ``vist2 train`` (:mod:`vist2.training.data`): ``.txt``,
``.jsonl`` with ``text`` / ``caption`` / ``messages``, parquet, arrow, folders.

    vist2 tokenizer train --data data/text_en.jsonl data/text_zh.jsonl --vocab-size 4096 --out runs/tok
    vist2 init --preset tiny --tokenizer runs/tok --out runs/nano

    >>> from vist2.training.tokenizer import train_tokenizer
    >>> tok = train_tokenizer(["data/text_en.jsonl"], vocab_size=1024)   # doctest: +SKIP
    >>> tok.save_pretrained("runs/tok")                                     # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Iterator

# the ids are fixed by this order: 0 ends a document (and pads), 2 ends a turn (EOS)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")  # single ids, but ordinary text (kept by skip_special_tokens), as in Qwen3
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS)  # the byte alphabet plus the fixed tokens


def record_texts(record: dict) -> Iterator[str]:
    """The text a training record holds, whatever its kind (document, caption, chat)."""
    for key in ("text", "caption"):
        if isinstance(record.get(key), str):
            yield record[key]
    for m in record.get("messages") or ():
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            yield m["content"]


def corpus_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Every text in the sources, read by the training data readers."""
    from .data import open_source

    for path in paths:
        for rec, _, _ in open_source(path).raw():
            if rec is not None:
                yield from (t for t in record_texts(rec) if t)


def train_tokenizer(paths: Iterable[str | Path], vocab_size: int, min_frequency: int = 2):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE) trained on the texts of ``paths``.

    ``vocab_size`` counts everything: 256 byte symbols, the special tokens and the merges
    (a small corpus may stop short of it; ``len(tokenizer)`` is the real size).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size must be at least {MIN_VOCAB} (256 bytes + {MIN_VOCAB - 256} special "
                         f"tokens), got {vocab_size}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("--data: give at least one file or folder")
    tok = Tokenizer(models.BPE())
    # no normalizer and no prefix space: decode(encode(text)) == text, byte for byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + THINK_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    seen = 0

    def texts():
        nonlocal seen
        for t in corpus_texts(paths):
            seen += 1
            yield t

    tok.train_from_iterator(texts(), trainer=trainer)
    # the trainer marks every token it is given as special; <think> stays text (same ids)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    if not seen:
        raise ValueError(f"--data {' '.join(map(str, paths))}: no text found (records need a 'text', "
                         f"'caption' or 'messages' field)")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        clean_up_tokenization_spaces=False, model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def cmd_tokenizer_train(args) -> int:
    from ..errors import CLIError

    for p in args.data:
        if not Path(p).exists():
            raise CLIError(f"--data {p}: no such file or folder")
    try:
        tok = train_tokenizer(args.data, args.vocab_size, min_frequency=args.min_frequency)
    except ValueError as e:
        raise CLIError(str(e)) from e
    out = Path(args.out)
    tok.save_pretrained(str(out))
    print(f"wrote {out}: {len(tok)} tokens (byte-level BPE; eos {EOS_TOKEN}, pad {PAD_TOKEN}); "
          f"use it with: vist2 init --preset NAME --tokenizer {out} --out DIR")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``tokenizer`` (with ``tokenizer train``) to an argparse sub-parsers object."""
    t = sub.add_parser("tokenizer", help="train a small tokenizer", description="Tokenizer tools.")
    tsub = t.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    q = tsub.add_parser(
        "train", help="train a byte-level BPE tokenizer on training data",
        description="Train a byte-level BPE tokenizer (HF tokenizers) with the special tokens and chat template "
                    "VIST2 needs; writes a transformers tokenizer folder for vist2 init --tokenizer.",
    )
    q.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="files or folders in any format vist2 train reads (.txt, .jsonl, .parquet, .arrow)")
    q.add_argument("--vocab-size", required=True, type=int, metavar="N", help="tokens in all (bytes + specials + merges)")
    q.add_argument("--min-frequency", type=int, default=2, metavar="N", help="least count of a pair to merge")
    q.add_argument("--out", required=True, metavar="DIR", help="output folder")
    q.set_defaults(func=cmd_tokenizer_train)
    return t
