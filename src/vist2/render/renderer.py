"""The renderer: text or styled spans -> the largest font size at which it fits -> pixels.

See :mod:`vist2.render` for the layout, the shrink rule and the speed.

    >>> from vist2.render import RENDER_PRESETS, Renderer
    >>> r = Renderer.get(RENDER_PRESETS["tiny"])
    >>> r.render("hello").shape, r.font_size_for("hello"), r.fits("x" * 10_000)
    ((128, 128), 10, False)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .atlas import Geometry
from .chars import SlotTable
from .config import RENDER_PRESETS, Color, RenderConfig
from .fonts import font_cmap, resolve_font
from .lines import Chars
from .marks import drawn_text
from .spans import Span


class Renderer:
    """Draws text with one :class:`RenderConfig`.  Use :meth:`get` for a cached instance.

    Glyph tables and atlases grow lazily as new characters and sizes are seen,
    so an instance is not meant to be used from several threads at once (give
    each thread its own ``Renderer(config)``); separate processes (data loader
    workers) are fine.
    """

    _cache: dict[RenderConfig, "Renderer"] = {}
    _cache_lock = threading.Lock()

    @classmethod
    def get(cls, config: RenderConfig | None = None) -> "Renderer":
        """The shared renderer for ``config`` (glyph atlases are built once per process)."""
        config = RENDER_PRESETS["default"] if config is None else config
        r = cls._cache.get(config)
        if r is None:
            with cls._cache_lock:
                r = cls._cache.get(config)
                if r is None:
                    r = cls._cache[config] = cls(config)
        return r

    def __init__(self, config: RenderConfig) -> None:
        if not isinstance(config, RenderConfig):
            raise TypeError(f"Renderer needs a RenderConfig, got {type(config).__name__}")
        self.config = config
        self.font_path = resolve_font(config.font, "font")
        self.cjk_path = resolve_font(config.cjk_font, "cjk_font") if config.cjk_font is not None else None
        self._table = SlotTable(font_cmap(self.font_path),
                                font_cmap(self.cjk_path) if self.cjk_path is not None else frozenset())
        self._geoms: dict[int, Geometry] = {}
        self._style_index = {n: i for i, n in enumerate(config.style_names)}
        self._style_colored, self._lut_rgb, self._lut_l = _style_luts(config)
        self._lut_plain = self._lut_l[0].copy()
        self._fit_tables = None  # LineFit's per-character and per-piece measures, built on first use

        geo = self._geometry(config.min_font_size)
        if geo.cols < 2 or geo.rows < 1:
            raise ValueError(
                f"RenderConfig: at min_font_size={config.min_font_size} the {config.width}x{config.height} "
                f"image (margin {config.margin}) holds {geo.cols} columns x {geo.rows} rows; need at least 2x1 "
                "(lower min_font_size/margin or enlarge width/height)"
            )

    def __reduce__(self):
        # Fonts do not pickle; a copy (e.g. in a spawned data-loader worker) is rebuilt from the config.
        return (Renderer, (self.config,))

    # ------------------------------------------------------------------ public API
    def render(self, text: str | Span | Sequence[Span | str]) -> np.ndarray:
        """Text or spans -> uint8 array ``(height, width)``, or ``(height, width, 3)`` in colour.

        Raises ``ValueError`` if the text does not fit at ``min_font_size`` or a
        span names an unknown style.
        """
        chars, styles = self._prepare(text)
        geo, lines = self._choose(chars)
        return self._compose(geo, chars, styles, lines)

    def render_image(self, text: str | Span | Sequence[Span | str]) -> Image.Image:
        arr = self.render(text)
        return Image.fromarray(arr, "RGB" if arr.ndim == 3 else "L")

    def fits(self, text: str | Span | Sequence[Span | str]) -> bool:
        """Whether the text fits at ``min_font_size`` (i.e. :meth:`render` will not raise)."""
        chars, _ = self._prepare(text)
        return self._fits_at(chars, self.config.min_font_size) is not None

    def font_size_for(self, text: str | Span | Sequence[Span | str]) -> int:
        """The font size the shrink rule picks; ``ValueError`` if none fits."""
        chars, _ = self._prepare(text)
        return self._choose(chars)[0].size

    def grid(self, font_size: int) -> tuple[int, int, int, int]:
        """``(cell_w, cell_h, cols, rows)`` of the cell grid at ``font_size``."""
        g = self._geometry(font_size)
        return g.cell_w, g.cell_h, g.cols, g.rows

    def cells(self, text: str | Span | Sequence[Span | str]) -> tuple[int, np.ndarray]:
        """Which character :meth:`render` draws in each cell: ``(font_size, codes)``, ``codes`` the
        ``(rows, cols)`` code points of the grid (0 where nothing is drawn; a wide character fills both
        of its cells). Cell ``(r, c)`` is the box at ``(margin + c * cell_w, margin + r * cell_h)``
        (:meth:`grid`). What a character-level training target needs.

            >>> r = Renderer.get(RenderConfig(width=64, height=32, font_size=10, min_font_size=10))
            >>> size, codes = r.cells("ab\\ncd")
            >>> "".join(chr(c) for c in codes[0] if c)   # marks, not new rows: one line
            'ab↵cd'
        """
        chars, _ = self._prepare(text)
        geo, lines = self._choose(chars)
        codes = np.zeros((geo.rows, geo.cols), np.int64)
        if len(lines):
            drawn = drawn_text("".join(t for t, _ in self._parts(text)))
            cps = np.frombuffer(drawn.encode("utf-32-le", "surrogatepass"), np.uint32)
            line_idx, col, pos = chars.place(lines, geo.cols)
            cp = cps[pos].astype(np.int64)
            codes[line_idx, col] = cp
            wide = chars.width[pos] == 2
            codes[line_idx[wide], col[wide] + 1] = cp[wide]
        return geo.size, codes

    # ------------------------------------------------------------------ text -> slots
    def _prepare(self, text) -> tuple[Chars, np.ndarray | None]:
        """Text or spans -> the characters as drawn (slots), and each one's style id (None: all plain)."""
        parts = self._parts(text)
        # The spans are drawn as their joined text would be (marks and NFC over the whole text), so a
        # style never changes the layout: a styled chunk fits exactly when its plain text fits.
        full = drawn_text("".join(t for t, _ in parts))
        cps = np.frombuffer(full.encode("utf-32-le", "surrogatepass"), np.uint32)
        chars = Chars(self._table, self._table.lookup(cps), by_char=self.config.wrap == "char")
        return chars, (_drawn_styles(parts, full) if any(s for _, s in parts) else None)

    def _parts(self, text) -> list[tuple[str, int]]:
        """``(text, style id)`` of each piece of a str, a Span or a sequence of them."""
        if isinstance(text, str):
            return [(text, 0)]
        if isinstance(text, Span):
            text = [text]
        parts = []
        for item in text:
            if isinstance(item, str):
                parts.append((item, 0))
            elif isinstance(item, Span):
                sid = self._style_index.get(item.style)
                if sid is None:
                    raise ValueError(
                        f"unknown style {item.style!r}; RenderConfig.styles defines {list(self._style_index)}"
                    )
                parts.append((item.text, sid))
            else:
                raise TypeError(f"render() takes str, Span or a sequence of them, got {type(item).__name__}")
        return parts

    # ------------------------------------------------------------------ geometry / atlas
    def _geometry(self, size: int) -> Geometry:
        g = self._geoms.get(size)
        if g is None:
            g = self._geoms[size] = Geometry(self.config, size, self.font_path, self.cjk_path, self._table.n_ids)
        return g

    # ------------------------------------------------------------------ layout
    def _fits_at(self, chars: Chars, size: int):
        g = self._geometry(size)
        if not chars.may_fit(g.cols, g.rows):
            return None
        lines = chars.wrap(g.cols, g.rows)
        return lines

    def _choose(self, chars: Chars):
        cfg = self.config
        # Sizes that pass the cheap area/paragraph test, largest first.  Most
        # chunks fit at the first candidate, so usually one wrap is enough.
        cands = []
        for size in range(cfg.font_size, cfg.min_font_size - 1, -1):
            g = self._geometry(size)
            if chars.may_fit(g.cols, g.rows):
                cands.append(size)
        if not cands:
            raise self._overflow_error(chars)
        for i in range(min(2, len(cands))):
            got = self._fits_at(chars, cands[i])
            if got is not None:
                return self._geometry(cands[i]), got
        best = self._fits_at(chars, cands[-1]) if len(cands) > 2 else None
        if best is None:
            raise self._overflow_error(chars)
        # Bisection over candidate indices; invariant: cands[lo] fits, cands[hi] does not.
        hi, lo = 1, len(cands) - 1
        while lo - hi > 1:
            mid = (hi + lo) // 2
            got = self._fits_at(chars, cands[mid])
            if got is None:
                hi = mid
            else:
                lo, best = mid, got
        return self._geometry(cands[lo]), best

    def _overflow_error(self, chars: Chars) -> ValueError:
        cfg = self.config
        g = self._geometry(cfg.min_font_size)
        lines = chars.wrap(g.cols, None)
        over = lines[g.rows :]
        n_chars = int(sum(chars.count_visible(s, e) for s, e in over))
        return ValueError(
            f"text does not fit a {cfg.width}x{cfg.height} image even at min_font_size={cfg.min_font_size} "
            f"({g.cols} columns x {g.rows} rows of {g.cell_w}x{g.cell_h} px cells): it needs {len(lines)} lines, "
            f"so {len(over)} line(s) holding {n_chars} character(s) did not fit. Render less text per image, "
            "or change RenderConfig: larger width/height, smaller min_font_size, line_spacing or margin."
        )

    # ------------------------------------------------------------------ compose
    def _compose(self, g: Geometry, chars: Chars, styles: np.ndarray | None, lines) -> np.ndarray:
        ids, sgrid, colour = self._cell_grids(g, chars, styles, lines)
        g.ensure(ids, self._table, self._lut_plain)
        cfg = self.config
        if sgrid is None:
            # The one gather that draws every glyph: (rows, cols, cell_h, cell_w).
            # np.take is ~4x faster than atlas[ids] here.
            canvas = _paste(np.take(g.plain, ids, axis=0), cfg)
            return np.repeat(canvas[:, :, None], 3, axis=2) if colour else canvas
        alpha = np.take(g.alpha, ids, axis=0)
        sg = sgrid[:, :, None, None]
        lut = self._lut_rgb if colour else self._lut_l
        return _paste(lut[sg, alpha], cfg)  # cells (rows, cols, cell_h, cell_w[, 3])

    def _cell_grids(self, g: Geometry, chars: Chars, styles: np.ndarray | None, lines):
        """The atlas id of every grid cell, its style id (None: all plain), and whether to draw in colour."""
        cfg = self.config
        rows, cols = g.rows, g.cols
        ids = np.zeros((rows, cols), np.intp)
        sgrid = None
        colour = cfg.mode == "RGB"
        if len(lines):
            line_idx, col, pos = chars.place(lines, cols)
            first = self._table.first_id[chars.slots[pos]]
            wide = chars.width[pos] == 2
            ids[line_idx, col] = first
            ids[line_idx[wide], col[wide] + 1] = first[wide] + 1
            if styles is not None:
                used = np.unique(styles)
                if cfg.mode == "auto" and self._style_colored[used].any():
                    colour = True
                tail = chars.tail_styles(lines, styles)
                sgrid = np.zeros((rows, cols), np.int32)
                sgrid[: len(lines)] = tail[:, None]
                st = styles[pos]
                sgrid[line_idx, col] = st
                sgrid[line_idx[wide], col[wide] + 1] = st[wide]
                if not sgrid.any():
                    sgrid = None
        return ids, sgrid, colour


def _paste(cells: np.ndarray, cfg: RenderConfig) -> np.ndarray:
    """Cells ``(rows, cols, cell_h, cell_w[, 3])`` onto a background canvas, from the top-left margin."""
    rows, cols, ch, cw = cells.shape[:4]
    canvas = np.full((cfg.height, cfg.width) + cells.shape[4:], cfg.background, np.uint8)
    m = cfg.margin
    canvas[m : m + rows * ch, m : m + cols * cw].reshape(rows, ch, cols, cw, *cells.shape[4:])[...] = (
        cells.swapaxes(1, 2))
    return canvas

def _drawn_styles(parts: list[tuple[str, int]], full: str) -> np.ndarray:
    """The style id of each character of ``full`` (the drawn text of the joined ``parts``)."""
    norm, done, raw = [], 0, ""
    for t, s in parts:
        raw += t
        end = max(done, min(len(full), len(drawn_text(raw))))  # where this span's text ends when drawn
        norm.append((full[done:end], s))
        done = end
    if done < len(full):
        norm[-1] = (norm[-1][0] + full[done:], norm[-1][1])
    return np.repeat(np.array([s for _, s in norm], np.int32), np.array([len(t) for t, _ in norm], np.int64))


def _style_luts(config: RenderConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per style: whether it is coloured ``(S,)``, and the colour of a pixel with glyph coverage a
    ``(S, 256, 3)`` and its grey level (luma) ``(S, 256)``; style 0 is plain."""
    colors = config.style_colors()
    style_rgb = np.array([[_as_rgb(c) for c in colors[n]] for n in config.style_names], np.int32)
    colored = np.array([any(isinstance(c, tuple) for c in colors[n]) for n in config.style_names], bool)
    a = np.arange(256, dtype=np.int32)
    fg, bg = style_rgb[:, 0, :], style_rgb[:, 1, :]  # (S, 3)
    lut_rgb = ((bg[:, None, :] * 255 + (fg - bg)[:, None, :] * a[None, :, None] + 127) // 255).astype(np.uint8)
    luma = (lut_rgb.astype(np.int32) @ np.array([299, 587, 114]) + 500) // 1000
    return colored, lut_rgb, luma.astype(np.uint8)


def _as_rgb(c: Color) -> tuple[int, int, int]:
    return (c, c, c) if isinstance(c, int) else c


def render_text(text: str | Sequence[Span], config: RenderConfig | None = None) -> Image.Image:
    """Render with the shared :class:`Renderer` for ``config`` (default preset if None)."""
    return Renderer.get(config).render_image(text)
