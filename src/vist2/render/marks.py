"""Layout marks: line breaks, tabs and runs of spaces drawn as compact marks inside the text flow.

    >>> from vist2.render.marks import drawn_text, layout_marks, unmark
    >>> layout_marks("a\\r\\nb\\tc    d")
    'a↵b⇥c␣₄d'
    >>> unmark("a↵b⇥c␣₄d")
    'a b c d'
    >>> drawn_text("cafe\\u0301\\n") == "café↵"      # marks, then NFC: one cell per character
    True
"""

from __future__ import annotations

import re
import unicodedata

# Characters that end a line of text (str.splitlines' set); each is drawn as one MARK_NEWLINE.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
MARK_NEWLINE = 0x21B5  # ↵
_MARK_TAB = "\u21e5"  # ⇥
_MARK_SPACES = "\u2423"  # ␣, followed by the run's width in subscript digits
_SUBSCRIPT = str.maketrans("0123456789", "\u2080\u2081\u2082\u2083\u2084\u2085\u2086\u2087\u2088\u2089")
_LAYOUT_RE = re.compile(f"\r\n|[{LINE_BREAKS}]|\t| {{2,}}")
_MARKS_RE = re.compile(f"{_MARK_SPACES}[\u2080-\u2089]+|[{chr(MARK_NEWLINE)}{_MARK_TAB}]")


def _mark(m: "re.Match[str]") -> str:
    s = m.group()
    if s == "\t":
        return _MARK_TAB
    if s[0] == " ":
        return _MARK_SPACES + str(len(s)).translate(_SUBSCRIPT)
    return chr(MARK_NEWLINE)


def layout_marks(text: str) -> str:
    """The text as drawn: layout characters become compact marks inside the text flow.

    A line break (``\\n``, ``\\r\\n``, ``\\r`` and the other Unicode line/paragraph
    separators) becomes ``↵``, a tab ``⇥``, and a run of n >= 2 spaces ``␣`` followed by n
    in subscript digits (8 spaces of indentation: ``␣₈``); a single space stays a space.
    Nothing starts a new row, so a line break costs one cell instead of the rest of a row,
    and the structure stays readable (and learnable) from the image.

    >>> layout_marks("def f():\\n        return 1\\tx")
    'def f():↵␣₈return 1⇥x'
    """
    if not _LAYOUT_RE.search(text):
        return text
    return _LAYOUT_RE.sub(_mark, text)


def drawn_text(text: str) -> str:
    """The characters the renderer lays out: :func:`layout_marks`, then NFC."""
    text = layout_marks(text)
    if not unicodedata.is_normalized("NFC", text):
        # One cell per character: compose "e" + U+0301 into "é" where possible.
        text = unicodedata.normalize("NFC", text)
    return text


def unmark(text: str) -> str:
    """Marks back to plain whitespace (a space each): what an OCR engine that cannot read the
    marks should be compared with."""
    return _MARKS_RE.sub(" ", text)


def raw_index(raw: str, drawn_index: int) -> int:
    """The index in ``raw`` of the character drawn at ``drawn_index`` of ``layout_marks(raw)``
    (which must not fall inside a mark).

    >>> raw_index("a\\r\\n   b", 4)    # drawn: 'a↵␣₃b'
    6
    """
    shift = 0  # drawn length - raw length so far
    for m in _LAYOUT_RE.finditer(raw):
        start_drawn = m.start() + shift
        if start_drawn >= drawn_index:
            break
        shift += len(_mark(m)) - len(m.group())
    return drawn_index - shift
