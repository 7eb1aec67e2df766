"""Text metrics shared by tests, benchmarks and evaluation.

    >>> from vist2.metrics import cer
    >>> cer("红楼梦 first", "红楼 first")
    0.125
"""

from __future__ import annotations

import re

from rapidfuzz.distance import Levenshtein

_SPACE = re.compile(r"\s+")


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate: edit distance over characters, whitespace removed, per reference character.

    Whitespace is dropped on both sides because OCR and line wrapping disagree about it, not
    about the text.
    """
    ref, hyp = _SPACE.sub("", reference), _SPACE.sub("", hypothesis)
    if not ref:
        return float(bool(hyp))
    return Levenshtein.distance(ref, hyp) / len(ref)


def ocr_read_back(ocr, renderer, text: str, scale: int = 2) -> str:
    """Render ``text`` and read it back with an OCR engine (a ``rapidocr_onnxruntime.RapidOCR``).

    The image is upscaled ``scale`` times with LANCZOS first: that adds no information, it only
    brings 10-14 px lines closer to the line height rapidocr's recogniser was trained on. The
    detected boxes are ordered by the renderer's own text rows, then left to right.
    """
    import numpy as np
    from PIL import Image

    size = renderer.font_size_for(text)
    img = renderer.render_image(text)
    big = img.resize((img.width * scale, img.height * scale), Image.LANCZOS)
    result, _ = ocr(np.asarray(big.convert("RGB")), use_cls=False)
    _, cell_h, _, _ = renderer.grid(size)
    m = renderer.config.margin
    boxes = sorted(
        (int((sum(p[1] for p in box) / len(box) / scale - m) // cell_h), min(p[0] for p in box), txt)
        for box, txt, _score in (result or [])
    )
    return "".join(t for _, _, t in boxes)
