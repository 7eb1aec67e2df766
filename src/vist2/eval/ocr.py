"""OCR by compression ratio (the paper's Table 2 protocol).

    vist2 eval ocr --model runs/tiny --data passage.txt --ratios 1,2,4,8,10,16 --samples 100 --out runs/eval/ocr.json

For each ratio r the data's tokens are cut into chunks of L = r x n_visual tokens; each chunk's text
is rendered with the model's render config (the same geometry for every r, so a larger r means
smaller glyphs), read by the vision tower and aligner, and the model writes the text back greedily
in the MT-OCR layout ``[v, text...]`` (causal, :func:`vist2.layout.ocr_segments`). The
transcription is scored against the rendered text with ROUGE-1/2/L (a tokenisation that splits
CJK characters, see :class:`vist2.eval.common.CJKTokenizer`) and the character error rate.

The model's own K (r = K / n_visual) is one point of the sweep. A ratio whose chunks do not fit the
image even at the smallest font is a skipped point, with the reason in the JSON.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Sequence

import torch

from ..layout import ChunkInfo, Kind, build_sample, collate, ocr_segments
from ..metrics import cer
from ..runtime import eos_ids
from .common import ROUGE_TYPES, rouge, rouge_scorer, table

DEFAULT_RATIOS = (1, 2, 4, 8, 10, 16)


def parse_ratios(text: str) -> list[float]:
    """``"1,2,4"`` -> ``[1.0, 2.0, 4.0]``; ``ValueError`` for anything that is not a positive number."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            r = float(part)
        except ValueError:
            raise ValueError(f"--ratios: {part!r} is not a number") from None
        if not (r > 0 and math.isfinite(r)):
            raise ValueError(f"--ratios: ratios must be positive, got {part!r}")
        out.append(r)
    if not out:
        raise ValueError("--ratios: give at least one ratio")
    return out


def ocr_scores(reference: str, hypothesis: str, scorer=None) -> dict[str, float]:
    """ROUGE-1/2/L F-measures and CER of one transcription (ROUGE 1.0 and CER 0 when they match)."""
    return {**rouge(reference, hypothesis, scorer), "cer": cer(reference, hypothesis)}


@torch.no_grad()
def ocr_prompt_ids(model, processor) -> list[int]:
    """The ids of the model's ``ocr_prompt`` (what asks it to transcribe a page), [] when it has none."""
    prompt = getattr(model.config, "ocr_prompt", None)
    return processor.encode(prompt) if prompt else []


def transcribe(model, visual_embeds: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int] = (),
               n_tokens: int | None = None, prompt_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy MT-OCR transcription of a batch of images: ``(N, n_visual, D)`` visual embeddings -> token ids.

    The layout ``[v, g_1 .. g_max]`` is planned once by :func:`ocr_segments`; since it is causal, the
    plan of a prefix is the prefix of this plan, so each step feeds the next slot with its planned
    position and its row of the planned mask, against a KV cache. Rows stop at a stop id (not
    included); ``n_tokens`` masks padded vocabulary rows the tokenizer cannot decode; ``prompt_ids``
    (:func:`ocr_prompt_ids`) go between the image and the transcription, as the model was trained.
    """
    from transformers import DynamicCache

    from ..attention import additive_mask

    N, n_visual = visual_embeds.shape[0], visual_embeds.shape[1]
    dev, dtype = model.device, visual_embeds.dtype
    # the token values do not change positions or visibility, so placeholders plan the whole run
    plan = collate([build_sample(ocr_segments([[0] * max_new_tokens], n_visual, prompt_ids))] * N)
    mask = additive_mask(plan, dtype).to(dev)
    position = plan.position.to(dev)
    visual = plan.kind == Kind.VISUAL
    cache = DynamicCache(config=model.config.text_config)
    out: list[list[int]] = [[] for _ in range(N)]
    done = torch.zeros(N, dtype=torch.bool)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long)
    ids = plan.input_ids[:, : n_visual + len(prompt_ids)]  # the visual slots (-1, from visual_embeds), the prompt
    start = 0
    for step in range(max_new_tokens):
        end = start + ids.shape[1]
        logits = model(
            input_ids=ids.to(dev), visual_mask=visual[:, start:end].to(dev),
            visual_embeds=visual_embeds if step == 0 else None,
            position_ids=position[:, start:end], attention_mask=mask[:, :, start:end, :end],
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1].float()
        if n_tokens is not None:
            logits[:, n_tokens:] = float("-inf")
        nxt = logits.argmax(-1).cpu()
        done |= torch.isin(nxt, stop)
        for i in range(N):
            if not done[i]:
                out[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        ids, start = nxt[:, None], end
    return out


def read_back(model, processor, texts: Sequence[str], margin: float = 0.1, batch_size: int = 8,
              blank: bool = False) -> list[dict]:
    """Recall: render each text as the model's chunks are rendered, let the model transcribe the images
    greedily (at most ``L + ceil(margin x L)`` tokens, L the text's own token count, as in
    :func:`evaluate_ocr`) and score them: ``[{"reference", "transcription", "cer"}]``. ``blank``
    gives the model empty pages instead (what it writes without reading: the baseline for its CER)."""
    stop, n_tokens = eos_ids(model.config.text_config, processor.tokenizer), len(processor.tokenizer)
    out = []
    for i in range(0, len(texts), batch_size):
        batch = list(texts[i : i + batch_size])
        L = max(len(processor.encode(t)) for t in batch)
        pixels = processor.pixels_from_texts(batch).to(model.device, model.dtype)
        if blank:
            pixels = torch.full_like(pixels, processor.renderer.config.background / 255)
        with torch.no_grad():
            visual = model.model.encode_images(pixels)
        gens = transcribe(model, visual, L + math.ceil(margin * L), stop, n_tokens, ocr_prompt_ids(model, processor))
        hyps = [processor.decode(g) for g in gens]
        out += [{"reference": r, "transcription": h, "cer": cer(r, h)} for r, h in zip(batch, hyps)]
    return out


def _chunks(processor, docs_ids: list[list[int]], L: int, n_visual: int, n: int) -> list[tuple[list[int], str]]:
    """The first ``n`` closed chunks of at most L tokens (cut by the fit rule, as in training), in
    document order, with the text an image of each shows (a character split by a chunk boundary is
    shown in the later chunk)."""
    out = []
    for d, ids in enumerate(docs_ids):
        infos = [ChunkInfo(tuple(c), n_visual, 0, d) for c in processor.chunker(L)(ids).closed]
        infos = infos[: n - len(out)]
        out += [(list(c.tokens), t) for c, t in zip(infos, processor.chunk_texts(infos))]
        if len(out) >= n:
            break
    return out


def _check_settings(samples: int, batch_size: int, margin: float) -> None:
    if samples <= 0:
        raise ValueError(f"samples must be > 0, got {samples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")


def _ratio_chunks(processor, docs_ids: list[list[int]], point: dict, n_visual: int, samples: int):
    """The chunks (token ids, text) to read at ``point``'s ratio, the ones that fit the image; or
    ``None`` with ``point["skipped"]`` saying why there are none."""
    r, L = point["ratio"], point["tokens_per_image"]
    if L < 1:
        point["skipped"] = f"r={r:g} gives {r * n_visual:g} tokens per image; at least 1 is needed"
        return None
    chunks = _chunks(processor, docs_ids, L, n_visual, samples)
    if not chunks:
        longest = max((len(x) for x in docs_ids), default=0)
        point["skipped"] = (f"no document has a whole chunk of L={L} tokens (r={r:g} x n_visual={n_visual}); "
                            f"the longest has {longest} tokens")
        return None
    fits = [processor.renderer.fits(t) for _, t in chunks]
    point["unfit"] = fits.count(False)
    chunks = [c for c, ok in zip(chunks, fits) if ok]
    if not chunks:
        rc = processor.renderer.config
        point["skipped"] = (f"a chunk of L={L} tokens does not fit the {rc.height}x{rc.width} image even at "
                            f"min_font_size={rc.min_font_size}")
        return None
    return chunks


def _read_back(model, processor, texts: list[str], cap: int, stop, n_tokens: int) -> list[str]:
    """Render ``texts``, read the images, transcribe greedily (at most ``cap`` tokens each)."""
    pixels = processor.pixels_from_texts(texts).to(model.device, model.dtype)
    with torch.no_grad():
        visual = model.model.encode_images(pixels)
    gens = transcribe(model, visual, cap, stop, n_tokens, ocr_prompt_ids(model, processor))
    return [processor.decode(g) for g in gens]


def _score_point(model, processor, chunks, point: dict, cap: int, batch_size: int, examples: int,
                 progress: bool) -> None:
    """Transcribe ``chunks`` in batches and fill ``point`` with the mean scores and the geometry."""
    from tqdm.auto import tqdm

    stop, n_tokens = eos_ids(model.config.text_config, processor.tokenizer), len(processor.tokenizer)
    scorer = rouge_scorer()
    t0 = time.perf_counter()
    scores: list[dict] = []
    point["examples"] = []
    bar = tqdm(total=len(chunks), desc=f"ocr r={point['ratio']:g} L={point['tokens_per_image']}", unit="img",
               disable=not progress, file=sys.stderr)
    for i in range(0, len(chunks), batch_size):
        texts = [t for _, t in chunks[i : i + batch_size]]
        for ref, hyp in zip(texts, _read_back(model, processor, texts, cap, stop, n_tokens)):
            scores.append(ocr_scores(ref, hyp, scorer))
            if len(point["examples"]) < examples:
                point["examples"].append({"reference": ref[:300], "transcription": hyp[:300]})
        bar.update(len(texts))
    bar.close()
    point["n"] = len(scores)
    for k in (*ROUGE_TYPES, "cer"):
        point[k] = sum(s[k] for s in scores) / len(scores)
    point["chars_per_image"] = sum(len(t) for _, t in chunks) / len(chunks)
    # the fit rule closes a chunk before L tokens when its text would not fit the image
    point["mean_tokens_per_image"] = sum(len(c) for c, _ in chunks) / len(chunks)
    point["font_size"] = min(processor.renderer.font_size_for(t) for _, t in chunks)
    point["seconds"] = round(time.perf_counter() - t0, 3)


def evaluate_ocr(model, processor, documents: Sequence[str], ratios: Sequence[float] = DEFAULT_RATIOS,
                 samples: int = 100, batch_size: int = 8, margin: float = 0.1, progress: bool = True,
                 examples: int = 2) -> list[dict]:
    """One result per ratio: mean ROUGE-1/2/L F-measure and CER over up to ``samples`` images, or
    ``{"ratio", "tokens_per_image", "skipped": reason}``.

    Generation stops at EOS or after ``L + ceil(margin * L)`` tokens (MT-OCR training has no stop
    token after a chunk, so a trained model usually runs to the cap; the margin keeps a reader that
    drops a few tokens from being cut short).
    """
    _check_settings(samples, batch_size, margin)
    n_visual, K = model.config.n_visual, model.config.chunk_tokens
    docs_ids = [processor.encode(d) for d in documents]
    points = []
    for r in ratios:
        L = int(round(r * n_visual))
        point: dict = {"ratio": r, "tokens_per_image": L, "model_ratio": L == K}
        points.append(point)
        chunks = _ratio_chunks(processor, docs_ids, point, n_visual, samples)
        if chunks is not None:
            _score_point(model, processor, chunks, point, L + math.ceil(margin * L), batch_size, examples, progress)
    return points


def format_table(points: Sequence[dict]) -> str:
    rows = []
    for p in points:
        tag = " (model K)" if p.get("model_ratio") else ""
        if "skipped" in p:
            rows.append([f"{p['ratio']:g}{tag}", p["tokens_per_image"], 0, "-", "-", "-", "-", "skipped: " + p["skipped"]])
        else:
            note = f"{p['unfit']} chunk(s) did not fit" if p.get("unfit") else ""
            rows.append([f"{p['ratio']:g}{tag}", p["tokens_per_image"], p["n"], f"{p['rouge1']:.4f}",
                         f"{p['rouge2']:.4f}", f"{p['rougeL']:.4f}", f"{p['cer']:.4f}", note])
    return table(rows, ["ratio", "L", "n", "ROUGE-1", "ROUGE-2", "ROUGE-L", "CER", "note"])


def cmd_eval_ocr(args) -> int:
    from ..errors import CLIError
    from ..runtime import load_checkpoint as load
    from ..runtime import write_json
    from .common import command_line, model_geometry, provenance, read_documents

    try:
        ratios = parse_ratios(args.ratios)
        docs = read_documents(args.data)
        model, processor = load(args.model, args.device, args.dtype)
    except ValueError as e:
        raise CLIError(str(e)) from e
    samples = min(args.samples, args.limit) if args.limit is not None else args.samples
    try:
        points = evaluate_ocr(model, processor, docs, ratios, samples=samples, batch_size=args.batch_size,
                              margin=args.margin, progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e)) from e
    cfg = model.config
    results = {
        "evaluation": "ocr",
        "provenance": provenance(args.model, cfg, args.data, command_line("vist2 eval ocr", args)),
        "model_geometry": model_geometry(cfg, image=[cfg.render["height"], cfg.render["width"]],
                                         min_font_size=processor.renderer.config.min_font_size),
        "settings": {"ratios": ratios, "samples": samples, "batch_size": args.batch_size, "margin": args.margin,
                     "decoding": "greedy", "layout": "MT-OCR [v, text] causal", "metric": "mean F-measure"},
        "points": points,
    }
    path = write_json(args.out, results)
    print(format_table(points))
    print(f"wrote {path}")
    if all("skipped" in p for p in points):
        raise CLIError("no ratio could be evaluated: " + "; ".join(f"r={p['ratio']:g}: {p['skipped']}" for p in points))
    return 0


def add_parser(sub) -> None:
    q = sub.add_parser("ocr", help="OCR quality by compression ratio (ROUGE-1/2/L, CER)",
                       description="Cut the data into chunks of L = r x n_visual tokens, render each, let the model "
                                   "transcribe it greedily (MT-OCR layout) and score against the source per ratio.")
    q.add_argument("--model", required=True, metavar="DIR", help="a VIST2 checkpoint folder")
    q.add_argument("--data", required=True, metavar="PATH", help='plain UTF-8 text, or .jsonl with a "text" field')
    q.add_argument("--ratios", default=",".join(str(r) for r in DEFAULT_RATIOS), metavar="LIST",
                   help="comma-separated compression ratios r (default 1,2,4,8,10,16)")
    q.add_argument("--samples", type=int, default=100, metavar="N", help="images per ratio (default 100)")
    q.add_argument("--limit", type=int, default=None, metavar="N", help="quick run: at most N images per ratio")
    q.add_argument("--batch-size", type=int, default=8, metavar="B", help="images transcribed together")
    q.add_argument("--margin", type=float, default=0.1, metavar="F",
                   help="new tokens are capped at L + ceil(F x L) (default 0.1)")
    q.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("--out", required=True, metavar="FILE", help="results JSON")
    q.set_defaults(func=cmd_eval_ocr)
