"""The glyph atlas: per font size, the cell grid, the fonts at that size, and every glyph rasterised once.

Glyphs are drawn with FreeType (via Pillow) into fixed-size cell bitmaps, on first use at a size; a wide
glyph is split into a left and a right half-cell.  Drawing a page is then one gather from the atlas.

    >>> from vist2.render import RENDER_PRESETS, Renderer
    >>> g = Renderer.get(RENDER_PRESETS["default"])._geometry(9)
    >>> g.cell_w, g.cell_h, g.cols, g.rows, g.cjk_size
    (5, 11, 101, 46, 9)
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .chars import ID_TOFU1, ID_TOFU2, N_FIXED_IDS, SlotTable, grow
from .config import RenderConfig


class Geometry:
    """Everything that depends on the font size: cells, grid, fonts, atlas.

    ``alpha[i]`` is the coverage bitmap ``(cell_h, cell_w)`` of cell id ``i``, ``plain[i]`` the
    same through the plain style's colours, ``ready[i]`` whether it is drawn yet.
    """

    def __init__(self, cfg: RenderConfig, size: int, font_path: str, cjk_path: str | None, n_ids: int) -> None:
        self.size = size
        self.background = cfg.background
        # BASIC layout: glyphs are drawn one at a time, so shaping buys nothing,
        # and it keeps pixels identical whether or not Pillow has libraqm
        # (raqm would also add a dotted circle to a lone combining mark).
        self.font_main = ImageFont.truetype(font_path, size, layout_engine=ImageFont.Layout.BASIC)
        self.cell_w = max(1, int(self.font_main.getlength("0") + 0.5))
        # A CJK character fills a 2-cell box; if that box were wider than the
        # line pitch, gaps between lines would be narrower than gaps between
        # characters and the page would read as vertical columns (rapidocr
        # does exactly that).  So the pitch is at least two cell widths.
        self.cell_h = max(1, int(size * cfg.line_spacing + 0.5), 2 * self.cell_w)
        self.cols = (cfg.width - 2 * cfg.margin) // self.cell_w
        self.rows = (cfg.height - 2 * cfg.margin) // self.cell_h
        # The CJK em box nearly fills the two-cell box (CJK at the Latin pixel
        # size would waste ~20% of its width), leaving >= 1 px (~8%) so adjacent
        # characters and lines do not touch: measured with rapidocr on eight
        # 1024-token Chinese chunks at 6x12 px cells, filling the box exactly
        # gave CER 4.1%, one pixel less 1.0%.
        box = min(2 * self.cell_w, self.cell_h)
        self.cjk_size = max(1, min(box - 1, int(0.92 * box + 0.5)))
        self.font_cjk = (
            ImageFont.truetype(cjk_path, self.cjk_size, layout_engine=ImageFont.Layout.BASIC)
            if cjk_path is not None
            else None
        )
        # Baselines are per font (not per glyph) so punctuation keeps its place
        # in the line: centre a reference ink box vertically in the cell.
        self.baseline_main = self._baseline(self.font_main, "Hdgjpqy")
        self.baseline_cjk = self._baseline(self.font_cjk, "国") if self.font_cjk is not None else 0
        # Glyphs are rasterised on first use at this size, not for every
        # character the renderer has ever seen.
        self.alpha = np.zeros((max(64, n_ids), self.cell_h, self.cell_w), np.uint8)
        self.plain = np.full_like(self.alpha, cfg.background)  # alpha through the plain style's LUT
        self.ready = np.zeros(len(self.alpha), bool)

    def _baseline(self, font, ref: str) -> float:
        left, top, right, bottom = font.getbbox(ref, anchor="ls")
        return (self.cell_h - (bottom - top)) / 2.0 - top

    def ensure(self, ids: np.ndarray, table: SlotTable, lut_plain: np.ndarray) -> None:
        """Rasterise the glyphs of the cell ``ids`` not drawn yet at this size (``lut_plain``: coverage ->
        grey of the plain style)."""
        if table.n_ids > len(self.alpha):
            cap = max(table.n_ids, 2 * len(self.alpha))
            self.alpha = grow(self.alpha, cap)
            self.plain = grow(self.plain, cap, self.background)
            self.ready = grow(self.ready, cap)
        if not self.ready[0]:
            self._draw_tofu(ID_TOFU1, 1)
            self._draw_tofu(ID_TOFU2, 2)
            self.plain[:N_FIXED_IDS] = lut_plain[self.alpha[:N_FIXED_IDS]]
            self.ready[:N_FIXED_IDS] = True
        missing = ids[~self.ready[ids]]
        if not len(missing):
            return
        for i in np.unique(missing).tolist():
            if self.ready[i]:
                continue  # the other half of a wide glyph drawn just before
            font, ch, ncells, half = table.id_info[i - N_FIXED_IDS]
            first = i - half
            bmp = self._draw_glyph(font, ch, ncells)
            for h in range(ncells):
                self.alpha[first + h] = bmp[:, h * self.cell_w : (h + 1) * self.cell_w]
            sl = slice(first, first + ncells)
            self.plain[sl] = lut_plain[self.alpha[sl]]
            self.ready[sl] = True

    def _draw_tofu(self, first: int, ncells: int) -> None:
        w, h = ncells * self.cell_w, self.cell_h
        img = Image.new("L", (w, h), 0)
        inset_x = 1 if w >= 4 else 0
        inset_y = max(0, int(round(h * 0.12)))
        ImageDraw.Draw(img).rectangle(
            (inset_x, inset_y, w - 1 - inset_x, h - 1 - inset_y), outline=255, width=1
        )
        a = np.asarray(img)
        for k in range(ncells):
            self.alpha[first + k] = a[:, k * self.cell_w : (k + 1) * self.cell_w]

    def _draw_glyph(self, font_idx: int, ch: str, ncells: int) -> np.ndarray:
        font = self.font_main if font_idx == 0 else self.font_cjk
        base = self.baseline_main if font_idx == 0 else self.baseline_cjk
        span, h = ncells * self.cell_w, self.cell_h
        pad = 2 * h + 4
        img = Image.new("L", (span + 2 * pad, h), 0)
        x0 = pad + (span - font.getlength(ch)) / 2.0
        ImageDraw.Draw(img).text((x0, base), ch, font=font, fill=255, anchor="ls")
        a = np.asarray(img)
        ink = np.flatnonzero(a.max(axis=0))
        if len(ink) == 0:
            return np.ascontiguousarray(a[:, pad : pad + span])
        left, right = int(ink[0]), int(ink[-1]) + 1
        if right - left <= span:
            # Keep the advance-centred position unless ink spills out of the
            # cell (zero-advance marks, wide italics); then slide it back in.
            start = pad
            if left < start:
                start = left
            elif right > start + span:
                start = right - span
            return np.ascontiguousarray(a[:, start : start + span])
        # Ink wider than its cells (e.self. "W" in a proportional main font): squeeze.
        squeezed = img.crop((left, 0, right, h)).resize((span, h), Image.LANCZOS)
        return np.asarray(squeezed)

