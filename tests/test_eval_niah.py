"""vist2 eval niah: RULER's needle samples (vist2.needle), scoring, the sweep through the engine, JSON and heatmap."""

import json
import random
import re

import pytest

from vist2.cli import main
from vist2 import needle
from vist2.eval import niah
from vist2.runtime import load_checkpoint

NEEDLE_RE = re.compile(r"One of the special magic \w+ for ([\w-]+) is: ([\w-]+)\.")
ASKED_RE = re.compile(r"The special magic \w+ for (.+) mentioned in the provided text (?:is|are)$")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_checkpoint(tiny_dir, "cpu")


def oracle(tokenizer):
    """Reads each prompt as the engine gets it: finds every needle, and the keys the answer's start asks
    for, and writes their values. Scores 1 only if the prompt holds the right needles, with distinct keys."""
    def generate(requests):
        out = []
        for r in requests:
            text = tokenizer.decode(r.prompt_ids)
            found = {}
            for k, v in NEEDLE_RE.findall(text):
                found.setdefault(k, []).append(v)
            asked = re.split(r", and |, ", ASKED_RE.search(text).group(1))
            out.append(" " + ", ".join(v for k in asked for v in found[k]) + ".")
        return out
    return generate


def test_oracle_scores_one_random_scores_zero_and_a_distractor_scores_zero(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    grid = niah.build_grid(tok, [300, 500], [0, 50, 100], 2, "plain", keys=3, values=2, queries=2)
    res = niah.evaluate_niah(oracle(tok), tok, grid, ["gcc", "none"], "plain", progress=False)
    assert res["modes"] == {"gcc": 1.0, "none": 1.0}
    assert all(c["scores"]["gcc"] == 1.0 for c in res["cells"]) and len(res["cells"]) == 6
    rng = random.Random(0)
    guess = lambda reqs: [" " + str(rng.randint(10**6, 10**7 - 1)) for _ in reqs]  # noqa: E731
    assert niah.evaluate_niah(guess, tok, grid, ["gcc"], "plain", progress=False)["modes"]["gcc"] < 0.02

    def distractor(reqs):  # the value of a key nobody asked for
        out = []
        for r in reqs:
            text = tok.decode(r.prompt_ids)
            asked = ASKED_RE.search(text).group(1)
            out.append(" ".join(v for k, v in NEEDLE_RE.findall(text) if k not in asked))
        return out
    assert niah.evaluate_niah(distractor, tok, grid, ["none"], "plain", progress=False)["modes"]["none"] == 0.0


def test_half_the_values_score_half():
    """RULER's string_match_all: the share of expected values in the output, case-insensitive."""
    assert niah.string_match_all(" 1234567 and nothing else", ["1234567", "7654321"]) == 0.5
    assert niah.string_match_all("  Angry-Fish\x01", ["angry-fish"]) == 1.0
    lm_eval = pytest.importorskip("lm_eval.tasks.ruler.common_utils")
    for pred, ref in ((" 1234567 and 7654321", ["1234567", "7654321", "1"]), ("x", ["y"]), ("AbC-d", ["abc-D"])):
        assert niah.string_match_all(pred, ref) == lm_eval.string_match_all(lm_eval.postprocess_pred([pred]), [ref])


def test_needles_land_at_the_asked_depth_within_a_sentence(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    depths = [0, 10, 25, 50, 75, 90, 100]
    for hay in (None, needle.haystack_sentences(None)):
        for s in niah.build_grid(tok, [600], depths, 2, "plain", keys=2, haystack=hay):
            assert s.context[s.needle_at :].startswith("One of the special magic number for "[:24])
            assert s.context[s.needle_at :].startswith(f"One of the special magic numbers for {s.queries[0]} is: ")
            sentence = max(map(len, needle.REPEAT)) + 70  # a haystack sentence, or a distractor needle
            assert abs(s.depth_actual - s.depth) <= 100 * sentence / (len(s.context) - s.needle_chars)
            assert s.haystack_sentences > 20
    edge = niah.build_grid(tok, [600], [0, 100], 1, "plain")
    assert [round(s.depth_actual, 6) for s in edge] == [0.0, 100.0]


def test_prompts_fill_their_length_and_follow_rulers_template(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    for fmt in ("plain", "chat"):
        for s in niah.build_grid(tok, [300, 700], [50], 2, fmt):
            n = len(niah.request(tok, s, fmt, "gcc").prompt_ids)
            assert s.length - 30 < n <= s.length  # one more repeated sentence would not fit
    s = needle.build_sample(tok, 300, 50, 0)
    r = niah.request(tok, s, "plain", "gcc")
    assert tok.decode(r.prompt_ids) == (
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
        f"about the number afterwards.\n{s.context}\nWhat is the special magic number for {s.queries[0]} mentioned "
        f"in the provided text? The special magic number for {s.queries[0]} mentioned in the provided text is")
    assert s.context.startswith("The grass is green. The sky is blue.") and re.fullmatch(r"\d{7}", s.answers[0])
    assert tok.decode(r.query[slice(*r.question)]) == s.question  # the question span (drawn red)
    chat = niah.request(tok, s, "chat", "gcc")
    assert tok.decode(chat.suffix).endswith("assistant\n" + s.answer_prefix) and chat.query == r.query
    many = needle.build_sample(tok, 900, 50, 0, value_type="uuids", keys=4, values=2, queries=2)
    assert len(many.answers) == 4 and all(re.fullmatch(r"[0-9a-f-]{36}", a) for a in many.answers)
    assert "What are all the special magic uuids for " in many.question and ", and " in many.question


def test_every_mode_gets_the_same_prompts(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    seen = {}

    def record(reqs):
        for r in reqs:
            seen.setdefault(str(r.mode), []).append((r.prefix, r.query, r.suffix, r.question))
        return ["" for _ in reqs]
    grid = niah.build_grid(tok, [250], [0, 100], 3, "chat", keys=2)
    niah.evaluate_niah(record, tok, grid, ["gcc", "pcc", "none"], "chat", batch=2, progress=False)
    assert len(seen["gcc"]) == 6 and seen["gcc"] == seen["pcc"] == seen["none"]
    again = niah.build_grid(tok, [250], [0, 100], 3, "chat", keys=2)
    assert [s.context for s in again] == [s.context for s in grid]  # seeded: the same for every run and model
    other = niah.build_grid(tok, [250], [0, 100], 3, "chat", keys=2, seed=1)
    assert [s.answers for s in other] != [s.answers for s in grid]


def test_a_text_file_is_the_haystack(tiny, tmp_path):
    _, proc = tiny
    f = tmp_path / "hay.txt"
    f.write_text("First line here.\nSecond one!  Third?\n\nFourth sentence goes on. " * 3, encoding="utf-8")
    sents = needle.haystack_sentences(f)
    assert sents[:4] == ["First line here.", "Second one!", "Third?", "Fourth sentence goes on."]
    s = needle.build_sample(proc.tokenizer, 300, 50, 0, haystack=sents)
    assert "Fourth sentence goes on." in s.context and "grass" not in s.context  # cycled to fill the length


def test_the_engine_sweep_on_the_tiny_model_writes_json_and_heatmap(tiny_dir, tmp_path, capsys):
    out = tmp_path / "niah.json"
    assert main(["eval", "niah", "--model", str(tiny_dir), "--lengths", "160,220", "--depths", "0,100", "--samples",
                 "1", "--modes", "gcc,pcc,none", "--max-new-tokens", "4", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["evaluation"] == "niah" and res["task"]["prompt_format"] in ("chat", "plain")
    assert "vist2 eval niah" in res["provenance"]["command"] and "--eval-command" not in res["provenance"]["command"]
    assert len(res["cells"]) == 4 and set(res["modes"]) == {"gcc", "pcc", "none"}
    for row in res["samples"]:
        assert row["prompt_tokens"] <= row["length"] and set(row["outputs"]) == {"gcc", "pcc", "none"}
    assert res["modes"]["gcc"] == 0.0  # a random model does not write the 7-digit number
    from PIL import Image

    assert Image.open(out.with_suffix(".png")).size[0] > 200
    assert "gcc" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--depths", "0,150"], "percentages in [0, 100]"),
    (["--depths", "a"], "--depths: expected comma-separated numbers"),
    (["--modes", "gcc,xyz"], "--modes"),
    (["--keys", "1", "--queries", "2"], "--queries <= --keys"),
    (["--lengths", "20"], "the prompt without any haystack already takes"),
    (["--lengths", "100000"], "positions"),
    (["--haystack", "/nonexistent/hay.txt"], "--haystack /nonexistent/hay.txt: no such file"),
    (["--samples", "0"], "--samples must be >= 1"),
])
def test_bad_flags_are_clear_errors(tiny_dir, tmp_path, capsys, flags, message):
    assert main(["eval", "niah", "--model", str(tiny_dir), "--depths", "50", "--lengths", "200", *flags,
                 "--no-progress", "--out", str(tmp_path / "x.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_the_demos_needle_is_asked_from_memory_and_from_text(tiny):
    model, proc = tiny
    n = niah.needle_demo(model, proc, length=300, max_new_tokens=3)
    assert re.fullmatch(r"\d{7}", n["answer"]) and n["answer"] in n["needle"] and n["prompt_tokens"] <= 300
    assert set(n["written"]) == {"gcc", "none"} and n["pages"] >= 1  # the haystack is pictures in gcc
    assert n["found"] == {m: n["answer"] in t for m, t in n["written"].items()}
    with pytest.raises(ValueError, match="without any haystack"):
        niah.needle_demo(model, proc, length=50)
