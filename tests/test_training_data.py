"""Training data: configs, readers, stage builders, packing, the batch stream (no model steps)."""

import json
import random
from pathlib import Path

import pytest

from vist2.chunking import fixed_chunker
from vist2.layout import IGNORE, Kind, build_sample, collate, query_parts, sft_segments
from vist2.runtime import write_json
from vist2.training.checkpoint import STATE_FILE, atomic_dir, clean_partial, latest_checkpoint, list_checkpoints
from vist2.training.config import PAPER_BATCH, load_config, ocr_images_per_row, paper_batch, stage_preset
from vist2.training.data import SkipCounter, check_source, open_source
from vist2.training.pipeline import StageDataset, make_loader
from vist2.training.stages import StageBuilder, images_for, olm_text_budget, pack

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. ") * 6


@pytest.fixture(scope="module")
def proc(tiny_dir):
    from vist2.processing import VIST2Processor

    return VIST2Processor.from_pretrained(tiny_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# -- configs ------------------------------------------------------------------------------


def test_presets_follow_table_8():
    # ocr: Table 8 says 4096, which holds 3 images of 1024 + 256 slots; the hard phase needs 8 (below)
    for stage, lr, length in (("caption", 5e-4, 1024), ("ocr", 5e-4, 10240), ("olm", 5e-4, 8192), ("sft", 1e-5, 8192)):
        c = stage_preset(stage)
        assert (c.learning_rate, c.max_length, c.weight_decay, c.warmup_ratio, c.lr_scheduler, c.epochs) == \
               (lr, length, 1e-4, 0.01, "cosine", 1.0)
    trains = {s: (c.train_vision, c.train_aligner, c.train_llm) for s in ("caption", "ocr", "olm", "sft")
              for c in [stage_preset(s)]}
    assert trains == {"caption": (False, True, False), "ocr": (True, True, False), "olm": (False, True, True),
                      "sft": (True, True, True)}


@pytest.mark.parametrize("stage", ["caption", "ocr", "olm", "sft"])
def test_yaml_configs_match_presets(stage):
    cfg = load_config(None, ROOT / "configs" / f"{stage}.yaml")
    preset = stage_preset(stage)
    for f in ("train_vision", "train_aligner", "train_llm", "max_length", "learning_rate", "weight_decay",
              "warmup_ratio", "lr_scheduler", "epochs", "curriculum"):
        assert getattr(cfg, f) == getattr(preset, f), f


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: olm\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(None, bad)
    with pytest.raises(ValueError, match="is for stage 'ocr'"):
        load_config("sft", ROOT / "configs" / "ocr.yaml")
    with pytest.raises(ValueError, match="max_length"):
        stage_preset("olm", max_length=0)
    with pytest.raises(ValueError, match="curriculum"):
        stage_preset("ocr", curriculum=[{"until": 0.5, "min_images": 1, "max_images": 1}])
    with pytest.raises(ValueError, match="nothing trains"):
        stage_preset("caption", train_aligner=False)
    assert load_config("olm", None, max_steps=7, lr=None).max_steps == 7


# -- readers --------------------------------------------------------------------------------


def test_readers_skip_and_count_bad_rows(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "good one"}, {"text": ""}, "{broken json", {"title": "no text"},
                                           "[1, 2]", {"text": "good two"}])
    (tmp_path / "b.txt").write_text("a whole text file is one document", encoding="utf-8")
    src = open_source(tmp_path)
    texts = [r["text"] for _, r in src.records("olm")]
    assert texts == ["good one", "good two", "a whole text file is one document"]
    assert src.skipped == {"empty_text": 1, "bad_json": 1, "no_text_field": 1, "not_an_object": 1}
    assert "4 skipped" in src.skipped.report()
    assert [r["text"] for _, r in open_source(f).records("ocr")] == ["good one", "good two"]


def test_source_without_usable_text_fails_at_start(tmp_path):
    f = write_jsonl(tmp_path / "empty.jsonl", [{"text": "  "}, {"caption": "x"}, "not json"])
    with pytest.raises(ValueError, match=r"no usable record for stage 'olm'.*empty_text=1.*'text'"):
        check_source(open_source(f), "olm")
    with pytest.raises(ValueError, match="no such file"):
        open_source(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        open_source(tmp_path / "x.csv")


def test_caption_and_chat_records(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "img" / "red.png")
    f = write_jsonl(tmp_path / "cap.jsonl", [{"image": "img/red.png", "caption": "A red square."},
                                             {"image": "img/missing.png", "caption": "gone"},
                                             {"image": "img/red.png", "caption": ""}])
    src = open_source(f)
    recs = [r for _, r in src.records("caption")]
    assert len(recs) == 1 and Path(recs[0]["image"]).is_file()  # relative to the jsonl
    assert src.skipped == {"missing_image": 1, "empty_caption": 1}
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ])
    src = open_source(chat)
    assert len(list(src.records("sft"))) == 1
    assert src.skipped == {"no_messages": 1, "no_user_message": 1}


def test_hf_parquet_and_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["first document", "", "second document"]})
    ds.to_parquet(str(tmp_path / "part.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path, streaming in ((tmp_path / "part.parquet", True), (tmp_path / "saved", False),
                            (tmp_path / "saved", True)):
        src = open_source(path, streaming=streaming)
        assert [r["text"] for _, r in src.records("olm")] == ["first document", "second document"], path
        assert src.skipped == {"empty_text": 1}


# -- builders ---------------------------------------------------------------------------------


def _builder(proc, stage, **kw):
    cfg = stage_preset(stage, **kw)
    return StageBuilder(cfg, proc.tokenizer, 64, 16, "visual", processor=proc)


def test_curriculum_schedule():
    cur = stage_preset("ocr").curriculum
    rng = random.Random(0)
    assert {images_for(cur, 0.1, rng) for _ in range(50)} == {1}
    assert {images_for(cur, 0.5, rng) for _ in range(200)} == {2, 3, 4}
    assert {images_for(cur, 0.9, rng) for _ in range(200)} == {5, 6, 7, 8}


def test_ocr_samples_follow_the_curriculum(proc):
    b = _builder(proc, "ocr", max_length=2000)
    doc = {"text": TEXT * 6}
    easy, _ = b.items(doc, random.Random(0), progress=0.0)
    hard, _ = b.items(doc, random.Random(0), progress=0.95)
    assert all(len(it.sample.chunks) == 1 for it in easy)
    assert all(5 <= len(it.sample.chunks) <= 8 for it in hard[:-1])  # the last takes what is left
    s = easy[0].sample
    assert s.kind[:16] == [Kind.VISUAL] * 16 and s.kind[16:80] == [Kind.TEXT] * 64  # [v1 c1]
    # 3 images of 16 + 64 slots fit in 250, the hard phase wants 8: an error, not a silently easier schedule
    with pytest.raises(ValueError, match=r"max_length=250 holds 3 OCR images.*up to 8.*max_length to 640"):
        _builder(proc, "ocr", max_length=250)


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen3-4b-paper", "tiny"])
def test_the_ocr_preset_reaches_its_hard_phase(proc, every_k, preset):
    """At the stage preset's max_length, the last phase's samples hold 5-8 images (paper: hard > 4)."""
    from vist2.config import preset_config

    mc = preset_config(preset)
    cfg = stage_preset("ocr")
    assert ocr_images_per_row(cfg, mc.chunk_tokens, mc.n_visual) >= 8
    b = StageBuilder(cfg, proc.tokenizer, mc.chunk_tokens, mc.n_visual, "visual", processor=every_k)
    b.encode = lambda text: list(range(100, 100 + 20 * mc.chunk_tokens))  # a 20-chunk document, no tokenizing
    hard, _ = b.items({"text": "x"}, random.Random(0), progress=0.95)
    counts = [len(it.sample.chunks) for it in hard]
    assert sum(counts) == 20 and all(5 <= n <= 8 for n in counts[:-1]) and max(counts) > 4
    assert max(len(it) for it in hard) <= cfg.max_length
    assert max(len(it) for it in hard) == max(counts) * (mc.chunk_tokens + mc.n_visual)


def test_paper_batch_presets_give_table_8_per_optimizer_step():
    """batch_size x grad_accum x devices = Table 8's batch (packed rows per optimizer step)."""
    assert PAPER_BATCH == {"0.6b": {"caption": 96, "ocr": 64, "olm": 64, "sft": 64},
                           "4b": {"caption": 64, "ocr": 32, "olm": 16, "sft": 16},
                           "8b": {"caption": 48, "ocr": 24, "olm": 8, "sft": 8}}
    for size, stages in PAPER_BATCH.items():
        for stage, rows in stages.items():
            for devices in (1, 8):
                c = load_config(stage, paper_batch=size, devices=devices)
                assert c.batch_size * c.grad_accum * devices == rows, (size, stage, devices)
    assert paper_batch("4b", "olm", devices=8) == {"batch_size": 1, "grad_accum": 2}
    assert paper_batch("0.6b", "caption", devices=8, batch_size=4) == {"batch_size": 4, "grad_accum": 3}
    c = load_config("olm", ROOT / "configs" / "olm.yaml", paper_batch="8b", devices=2, batch_size=2)
    assert (c.batch_size, c.grad_accum) == (2, 2)
    with pytest.raises(ValueError, match=r"paper_batch.*8 rows.*batch_size=1 x devices=16"):
        paper_batch("8b", "sft", devices=16)
    with pytest.raises(ValueError, match=r"paper_batch '4b'.*grad_accum=3"):
        load_config("olm", paper_batch="4b", devices=1, grad_accum=3)
    with pytest.raises(ValueError, match="paper_batch"):
        paper_batch("2b", "olm")


def test_olm_windows_fit_and_cover_the_document(proc):
    b = _builder(proc, "olm", max_length=200)
    W = olm_text_budget(200, 64, 16)
    assert W == 168  # 2 x (64 + 16) + 40 = 200 slots; asked of the layout
    ids = b.encode(TEXT * 3) + [b.doc_end]
    items, _ = b.items({"text": TEXT * 3}, random.Random(0), 0.0)
    assert all(len(it) <= 200 for it in items)
    got = [t for it in items for t, k in zip(it.sample.input_ids, it.sample.kind) if k == Kind.TEXT]
    assert got == ids  # every token once, in order, the document end included


def test_ocr_stop_ends_each_ocr_sample_with_the_turn_end(proc):
    doc = {"text": TEXT * 3}
    b = _builder(proc, "ocr", max_length=241, ocr_stop=True, curriculum=[{"until": 1.0, "min_images": 1,
                                                                         "max_images": 3}])
    items, _ = b.items(doc, random.Random(0), 0.5)
    plan = collate([it.sample for it in items])
    for r, it in enumerate(items):
        s = it.sample
        assert s.input_ids[-1] == b.turn_end and s.kind[-1] == Kind.TEXT and s.loss[-1]
        # the last character of the last page predicts the stop (labels sit at the predicting slot)
        assert plan.labels[r, len(s) - 2] == b.turn_end
        assert s.input_ids.count(b.turn_end) == 1
    # the stop takes a slot: 3 images of 16 + 64 and the stop need 241, not 240
    with pytest.raises(ValueError, match=r"holds 2 OCR images.*max_length to 241"):
        _builder(proc, "ocr", max_length=240, ocr_stop=True, curriculum=[{"until": 1.0, "min_images": 1,
                                                                           "max_images": 3}])


def test_ocr_mix_adds_single_image_ocr_samples_to_olm_and_sft(proc):
    doc = {"text": TEXT * 3}
    plain, _ = _builder(proc, "olm", max_length=200).items(doc, random.Random(0), 0.0)
    mixed, _ = _builder(proc, "olm", max_length=200, ocr_mix=1.0).items(doc, random.Random(0), 0.0)
    is_ocr = [it.sample.kind[0] == Kind.VISUAL for it in mixed]  # [v1 c1]; OLM windows start with text
    assert [it.sample.input_ids for it, o in zip(mixed, is_ocr) if not o] == [it.sample.input_ids for it in plain]
    ocr = [it for it, o in zip(mixed, is_ocr) if o]
    assert ocr and all(len(it.sample.chunks) == 1 for it in ocr)
    assert is_ocr != sorted(is_ocr)  # spread among the windows, not a run of OCR pages after them
    s = ocr[0].sample
    assert s.kind[:16] == [Kind.VISUAL] * 16 and s.kind[16:80] == [Kind.TEXT] * 64  # [v1 c1], loss on c1
    assert all(s.loss[16:80])
    chat = {"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": TEXT[:200]}]}
    sft, _ = _builder(proc, "sft", max_length=2000, ocr_mix=1.0).items(chat, random.Random(0), 0.0)
    assert any(len(it.sample.chunks) == 1 and it.sample.kind[0] == Kind.VISUAL for it in sft)
    with pytest.raises(ValueError, match="ocr_mix"):
        stage_preset("ocr", ocr_mix=0.5)
    with pytest.raises(ValueError, match="ocr_mix"):
        stage_preset("olm", ocr_mix=1.5)


def test_ocr_prompt_sits_between_each_page_and_its_text(proc):
    """ocr_prompt: [v1 p c1 v2 p c2 ...]: no loss on the prompt, the first character of a page predicted at
    the prompt's last slot, every text token still a target; in PT-2 and in ocr_mix samples alike, and the
    rows' budget counts the prompt."""
    prompt = proc.encode("OCR:")
    cur = [{"until": 1.0, "min_images": 2, "max_images": 2}]
    b = _builder(proc, "ocr", max_length=2 * (16 + len(prompt) + 64), ocr_prompt="OCR:", curriculum=cur)
    items, _ = b.items({"text": TEXT * 3}, random.Random(0), 0.5)
    s = items[0].sample
    page = [Kind.VISUAL] * 16 + [Kind.TEXT] * (len(prompt) + 64)
    assert s.kind == page * 2 and len(s.chunks) == 2
    assert s.input_ids[16 : 16 + len(prompt)] == prompt and s.input_ids[96 + len(prompt):][:len(prompt)] == prompt
    assert s.loss == ([False] * (16 + len(prompt)) + [True] * 64) * 2
    assert s.position == list(range(len(s)))  # causal, nothing evicted: as the plain MT-OCR layout
    plan = collate([s])
    assert plan.labels[0, 16 + len(prompt) - 1] == s.input_ids[16 + len(prompt)]  # the prompt asks for c1[0]
    assert plan.labels[0, 15] == -100  # the page's last visual slot predicts nothing: no loss on the prompt
    with pytest.raises(ValueError, match=rf"holds 1 OCR images of 16 visual \+ {len(prompt)} prompt \+ 64 text"):  # no room
        _builder(proc, "ocr", max_length=2 * (16 + 64), ocr_prompt="OCR:", curriculum=cur)
    mixed, _ = _builder(proc, "olm", max_length=200, ocr_mix=1.0, ocr_prompt="OCR:").items(
        {"text": TEXT * 3}, random.Random(0), 0.0)
    ocr = [it.sample for it in mixed if it.sample.kind[0] == Kind.VISUAL]
    assert ocr and all(o.input_ids[16 : 16 + len(prompt)] == prompt for o in ocr)
    with pytest.raises(ValueError, match="ocr_prompt"):
        stage_preset("olm", ocr_prompt="")


def test_memory_use_samples_score_only_what_the_pages_hold_or_predict(proc):
    """recall_samples: a passage of whole chunks, compressed with no loss, then a repeat of one of its
    spans, the only targets; chunk_start_samples: whole chunks, then only the next few tokens. The
    stage's own windows stay as they were."""
    doc = {"text": TEXT * 4}
    plain, _ = _builder(proc, "olm", max_length=400).items(doc, random.Random(0), 0.0)
    b = _builder(proc, "olm", max_length=400, recall_samples=2, chunk_start_samples=1, chunk_start_tokens=8)
    ids = b.encode(TEXT * 4)
    mixed, _ = b.items(doc, random.Random(0), 0.0)
    windows = [it for it in mixed if all(it.sample.loss[i] for i, k in enumerate(it.sample.kind) if k == Kind.TEXT)]
    assert [it.sample.input_ids for it in windows] == [it.sample.input_ids for it in plain]
    extra = [it.sample for it in mixed if it not in windows]
    assert len(extra) == 3 * len(plain)  # every draw fits this text: 2 recall + 1 chunk start per window
    recalls = starts = 0
    for s in extra:
        assert len(s) <= 400
        pages = [list(c.tokens) for c in s.chunks]
        passage = [t for c in pages for t in c]
        scored = [t for t, l in zip(s.input_ids, s.loss) if l]
        # the layout: the pages' text carries no loss, the scored tokens are the open tail after them
        assert s.input_ids[-len(scored):] == scored and s.kind[-len(scored) - 1] == Kind.VISUAL
        assert 1 <= len(pages) <= 4 and all(len(c) == 64 for c in pages)
        at = next(i for i in range(len(ids)) if ids[i : i + len(passage)] == passage)
        if ids[at + len(passage) : at + len(passage) + len(scored)] == scored and len(scored) <= 8:
            starts += 1  # what follows the pages (a repeat of a page can look the same: TEXT repeats)
        else:
            assert any(passage[o : o + len(scored)] == scored for o in range(len(passage)))  # a span of the pages
            assert 1 <= len(scored) <= 64
            recalls += 1
    assert recalls >= len(plain) and starts >= 1
    for bad in ({"stage": "ocr", "recall_samples": 1.0}, {"stage": "olm", "chunk_start_samples": -1},
                {"stage": "olm", "recall_samples": 17}):
        with pytest.raises(ValueError, match="_samples"):
            stage_preset(bad.pop("stage"), **bad)
    with pytest.raises(ValueError, match="chunk_start_tokens"):
        stage_preset("olm", chunk_start_tokens=0)


def test_sft_loss_on_response_only_and_tail_rule(proc):
    b = _builder(proc, "sft", max_length=4096)
    query = TEXT
    reply = "<think>\nIt is Genesis.\n</think>\n\nGenesis 1:1."
    items, reason = b.items({"messages": [{"role": "user", "content": query},
                                          {"role": "assistant", "content": reply}]}, random.Random(0), 0.0)
    assert reason is None and len(items) == 1
    plan = collate([items[0].sample])
    targets = plan.labels[plan.labels != IGNORE].tolist()
    want = b.encode(reply) + [b.turn_end]
    assert targets == want  # the response and its end, <think> included; nothing of the prompt
    assert "<think>" in proc.tokenizer.decode(targets)
    from vist2.chat import chat_prompt

    prefix, q, suffix, _ = chat_prompt(proc.tokenizer, [{"role": "user", "content": query}])
    chunks = [c for c, compressed, _, _ in query_parts(q, 64, 16, chunker=fixed_chunker(64))[0] if compressed]
    s = build_sample(sft_segments(prefix, q, suffix, want, 64, 16, "visual", chunker=fixed_chunker(64)))
    assert items[0].sample.input_ids == s.input_ids and len(chunks) >= 2  # the query is compressed
    # visual prompt encoding: 2,000 query tokens take ~500 slots, which a 300-slot row cannot hold
    long = _builder(proc, "sft", max_length=300).items(
        {"messages": [{"role": "user", "content": TEXT * 40}, {"role": "assistant", "content": "ok"}]},
        random.Random(0), 0.0)
    assert long == ([], "too_long")


def test_caption_sample(proc):
    b = _builder(proc, "caption", max_length=64)
    items, _ = b.items({"image": "x.png", "caption": "A small red circle in the centre."}, random.Random(0), 0.0)
    plan = collate([items[0].sample])
    assert plan.kind[0, :16].tolist() == [Kind.VISUAL] * 16 and plan.chunks[0].tokens == ()
    assert plan.labels[0, 15].item() == b.encode("A small red circle in the centre.")[0]  # v predicts the caption
    assert plan.labels[plan.labels != IGNORE].tolist()[-1] == b.doc_end


def test_packing_keeps_samples_apart(proc):
    b = _builder(proc, "olm", max_length=256)
    items = [it for t in ("one short document.", "another one.", "and a third.")
             for it in b.items({"text": t}, random.Random(0), 0.0)[0]]
    rows = list(pack(items, 256))
    assert len(rows) == 1 and len(rows[0]) == 3
    plan = collate([[it.sample for it in rows[0]]])
    assert plan.sample[0].max().item() == 2
    # no label crosses a sample boundary: the last token of a sample predicts nothing
    ends = (plan.sample[0, 1:] != plan.sample[0, :-1]).nonzero().flatten()
    assert all(plan.labels[0, e].item() == IGNORE for e in ends)
    assert len(list(pack(items, 256, pack=False))) == 3


# -- the batch stream ------------------------------------------------------------------------------


def _stream(proc, path, stage="olm", **kw):
    cfg = stage_preset(stage, max_length=kw.pop("max_length", 160), shuffle_buffer=kw.pop("shuffle_buffer", 4),
                       batch_size=kw.pop("batch_size", 2), seed=kw.pop("seed", 0))
    builder = StageBuilder(cfg, proc.tokenizer, 64, 16, "visual", processor=proc)
    return StageDataset(open_source(path), builder, proc, cfg, **kw)


def _key(batch):
    return (batch.index, batch.plan.input_ids.tolist(), None if batch.pixel_values is None
            else float(batch.pixel_values.sum()))


def test_stream_is_deterministic_for_any_worker_count_and_skip(proc, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"Document {i}. " + TEXT[: 40 * (i + 1)]} for i in range(12)])
    ds = _stream(proc, f, total_steps=10)
    ref = [_key(b) for b, _ in zip(make_loader(ds, 0), range(8))]
    assert [k[0] for k in ref] == list(range(8))
    two = [_key(b) for b, _ in zip(make_loader(_stream(proc, f, total_steps=10), 2), range(8))]
    assert two == ref
    resumed = [_key(b) for b, _ in zip(make_loader(_stream(proc, f, total_steps=10, skip=5), 2), range(3))]
    assert resumed == ref[5:8]
    other_seed = [_key(b) for b, _ in zip(make_loader(_stream(proc, f, total_steps=10, seed=1), 0), range(8))]
    assert other_seed != ref


def test_stream_holds_out_every_holdout_th_record(proc, tmp_path):
    """(How ranks share the samples: tests/test_training_launch.py.)"""
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i} " * 5} for i in range(20)])
    seen = {split: {i for i in range(20) if _stream(proc, f, split=split, holdout=5)._keep(i)}
            for split in ("train", "eval")}
    assert seen["eval"] == {0, 5, 10, 15} and seen["train"] == set(range(20)) - seen["eval"]


def test_stream_counts_skips_and_bad_images(proc, tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    f = write_jsonl(tmp_path / "c.jsonl", [{"image": "ok.png", "caption": "Blue."},
                                           {"image": "corrupt.png", "caption": "Broken."},
                                           {"image": "nothere.png", "caption": "Missing."}, "{bad"])
    ds = _stream(proc, f, stage="caption", max_length=64, batch_size=4, split="eval")
    batches = list(make_loader(ds, 0))
    skipped = SkipCounter()
    for b in batches:
        skipped.update(b.skipped)
    assert skipped == {"bad_image": 1, "missing_image": 1, "bad_json": 1}
    assert batches[0].pixel_values.shape == (1, 3, 128, 128)  # the good image, resized to the model's size
    assert batches[0].n_targets == len(proc.encode("Blue.")) + 1


def test_every_stage_stream_renders(proc, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (0, 200, 0)).save(tmp_path / "g.png")
    data = {
        "caption": write_jsonl(tmp_path / "c.jsonl", [{"image": "g.png", "caption": "A green square."}] * 3),
        "ocr": write_jsonl(tmp_path / "t.jsonl", [{"text": TEXT}] * 2),
        "olm": tmp_path / "t.jsonl",
        "sft": write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": TEXT},
                                                                {"role": "assistant", "content": "<think>\nx\n</think>\n\nok"}]}] * 2),
    }
    for stage, path in data.items():
        length = 640 if stage == "ocr" else 400  # ocr: the hard phase's 8 images of 16 + 64 slots
        b = next(iter(make_loader(_stream(proc, path, stage=stage, max_length=length, pad_multiple=128), 0)))
        assert b.plan.shape[1] % 128 == 0, stage
        assert b.n_targets > 0 and b.pixel_values is not None, stage
        assert b.pixel_values.shape[0] == len(b.plan.chunks) == b.plan.n_visual_slots // 16, stage


# -- atomic checkpoints --------------------------------------------------------------------------


def _fake_checkpoint(root, step, fail_after_files=None):
    with atomic_dir(root / f"step-{step:08d}") as tmp:
        for i in range(3):
            (tmp / f"part{i}.bin").write_bytes(b"x" * 1000)
            if fail_after_files is not None and i + 1 >= fail_after_files:
                raise RuntimeError("killed")
        write_json(tmp / STATE_FILE, {"complete": True, "step": step})


def test_interrupted_save_never_looks_complete(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 1)
    with pytest.raises(RuntimeError):
        _fake_checkpoint(root, 2, fail_after_files=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001"]
    assert latest_checkpoint(root).name == "step-00000001"
    assert (root / ".tmp-step-00000002").exists()  # left behind, ignored ...
    clean_partial(root)  # ... and removed at the next start
    assert not (root / ".tmp-step-00000002").exists()
    # a folder with the right name but no complete state (e.g. copied by hand, half-way) is ignored
    (root / "step-00000009").mkdir()
    (root / "step-00000009" / STATE_FILE).write_text('{"complete": tr')
    assert latest_checkpoint(root).name == "step-00000001"


def test_sigkill_during_save_leaves_no_loadable_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys

    root = tmp_path / "checkpoints"
    # the checkpoint and runtime modules alone (stdlib only), so the child starts in a blink
    code = f"""
import importlib.util, time
from pathlib import Path
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module
atomic_dir = load("ckpt", {str(ROOT / 'src/vist2/training/checkpoint.py')!r}).atomic_dir
write_json = load("runtime", {str(ROOT / 'src/vist2/runtime.py')!r}).write_json
with atomic_dir(Path({str(root)!r}) / "step-00000005") as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 100)
    print("writing", flush=True)
    time.sleep(60)
    write_json(tmp / "trainer_state.json", {{"complete": True}})
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert latest_checkpoint(root) is None
    assert not (root / "step-00000005").exists()


def test_sft_can_hold_the_chat_history_as_memory(proc):
    """chat_history='compressed': the SFT sample is laid out exactly as the engine lays out the same chat
    (vist2.chat.chat_prompt with history='compressed', styles by role), loss on the last reply only."""
    from vist2.chat import chat_prompt

    msgs = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": TEXT},
            {"role": "assistant", "content": "It tells of the beginning."}, {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "Light."}]
    b = _builder(proc, "sft", max_length=4096, chat_history="compressed")
    items, reason = b.items({"messages": msgs}, random.Random(0), 0.0)
    assert reason is None and len(items) == 1
    chat = chat_prompt(proc.tokenizer, msgs[:-1], history="compressed")
    want = b.encode("Light.") + [b.turn_end]
    prefix, query, suffix, question = chat
    s = build_sample(sft_segments(prefix, query, suffix, want, 64, 16, "visual", b.chunker(), question,
                                  chat.styles))
    assert items[0].sample.input_ids == s.input_ids and len(s.chunks) >= 2
    assert {st for c in s.chunks for st in ((c.style,) if isinstance(c.style, str) else c.style)} >= {"user", "plain"}
    plan = collate([items[0].sample])
    assert plan.labels[plan.labels != IGNORE].tolist() == want
    raw = _builder(proc, "sft", max_length=4096).items({"messages": msgs}, random.Random(0), 0.0)[0][0].sample
    assert len(raw.chunks) < len(s.chunks)  # the raw split compresses only the last user message
    with pytest.raises(ValueError, match="chat_history"):
        stage_preset("sft", chat_history="all")


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
def test_prompt_samples_are_the_engines_prompt_layout(proc, encoding):
    """prompt_samples: whole chunks laid out as the engine lays out a user's prompt under the stage's
    prompt encoding (with ``visual`` only their visual tokens enter the LLM), then the next tokens,
    the only targets; the stage's own windows stay as they were."""
    from vist2.layout import prompt_continuation_segments

    doc = {"text": TEXT * 4}
    plain, _ = _builder(proc, "olm", max_length=400).items(doc, random.Random(0), 0.0)
    cfg = stage_preset("olm", max_length=400, prompt_samples=1, prompt_sample_tokens=24, prompt_encoding=encoding)
    b = StageBuilder(cfg, proc.tokenizer, 64, 16, "visual", processor=proc)
    ids = b.encode(TEXT * 4)
    mixed, _ = b.items(doc, random.Random(0), 0.0)
    extra = [it.sample for it in mixed if it.sample.input_ids not in [p.sample.input_ids for p in plain]]
    assert len(mixed) == 2 * len(plain) and len(extra) == len(plain)
    for s in extra:
        pages = [list(c.tokens) for c in s.chunks]
        context = [t for c in pages for t in c]
        scored = [t for t, l in zip(s.input_ids, s.loss) if l]
        assert 1 <= len(pages) <= 4 and len(scored) == 24
        at = next(i for i in range(len(ids)) if ids[i : i + len(context)] == context)
        assert ids[at + len(context) : at + len(context) + 24] == scored  # what follows the prompt
        want = build_sample(prompt_continuation_segments(context, scored, 64, 16, encoding, proc.chunker(64)))
        assert s.input_ids == want.input_ids and s.position == want.position and s.kind == want.kind
        first = s.loss.index(True)
        n_text = sum(1 for k in s.kind[:first] if k == Kind.TEXT)
        assert n_text == (0 if encoding == "visual" else len(context))
    with pytest.raises(ValueError, match="prompt_samples"):
        stage_preset("sft", prompt_samples=1.0)
    with pytest.raises(ValueError, match="prompt_sample_tokens"):
        stage_preset("olm", prompt_sample_tokens=0)


def test_needle_samples_score_the_value_hidden_in_the_prompt(proc):
    """needle_samples: ``vist2 eval niah``'s prompts over the window's own text, laid out as the engine lays
    out the request; the targets are the value (and the stop) alone, and the needle is on a page."""
    from vist2.needle import NEEDLE

    text = " ".join(f"Sentence number {i} of the haystack is here." for i in range(300))
    b = _builder(proc, "olm", max_length=400, needle_samples=2)
    mixed, _ = b.items({"text": text}, random.Random(0), 0.0)
    needles = [it.sample for it in mixed if sum(it.sample.loss) < 16]
    assert len(needles) >= 2
    for s in needles:
        scored = proc.tokenizer.decode([t for t, l in zip(s.input_ids, s.loss) if l])
        value = scored.strip().split(".")[0]
        assert len(value) == 7 and value.isdigit() and scored.endswith("<|im_end|>")
        pages = proc.tokenizer.decode([t for c in s.chunks for t in c.tokens])
        key = pages.split("special magic numbers for ")[1].split(" is: ")[0]
        assert NEEDLE.format(type_v="numbers", key=key, value=value) in pages
        assert key.split("-")[0] in text.lower()  # keys are the haystack's own words
        first = s.loss.index(True)
        # the prompt (visual encoding): pages as visual tokens; raw text only around them (template, answer start)
        assert sum(1 for k in s.kind[:first] if k == Kind.VISUAL) >= 16 * len(s.chunks)
        assert "The special magic number for" in proc.tokenizer.decode(
            [t for t, k in zip(s.input_ids[:first], s.kind[:first]) if k == Kind.TEXT])


def test_copy_samples_repeat_a_span_as_raw_text(proc):
    """copy_samples: a span as raw text (the window's own, or random numbers and words), a line break, the
    same span again: no pages, and the repeat is the only target (the copying signal, from text)."""
    b = _builder(proc, "olm", max_length=400, copy_samples=3, copy_tokens=48)
    mixed, _ = b.items({"text": TEXT * 4}, random.Random(0), 0.0)
    copies = [it.sample for it in mixed if not it.sample.chunks]
    assert len(copies) >= 6
    newline = b.encode("\n")
    kinds = set()
    for s in copies:
        first = s.loss.index(True)
        span, scored = s.input_ids[:first], [t for t, l in zip(s.input_ids, s.loss) if l]
        assert all(s.loss[first:]) and span == scored + newline and 8 <= len(scored) <= 48
        assert set(s.kind) == {Kind.TEXT}
        kinds.add(proc.tokenizer.decode(scored) in TEXT * 4)
    assert kinds == {True, False}  # both the window's text and random strings
    with pytest.raises(ValueError, match="copy_samples"):
        stage_preset("sft", copy_samples=1.0)
    with pytest.raises(ValueError, match="copy_tokens"):
        stage_preset("olm", copy_tokens=4)


def test_plant_repeats_keeps_the_text_and_repeats_each_span_once():
    """plant_repeats: the text in order with each span planted twice (a line break before each copy), at
    random places; taking the planted copies out gives the text back; the second copy always carries the
    loss, the first only when asked (a random string cannot be predicted the first time), a line break
    never (where one is planted cannot be predicted)."""
    from vist2.training.stages import plant_repeats

    text, nl = list(range(1000, 1200)), (7,)
    spans = [(tuple(range(10, 30)), False), (tuple(range(40, 48)), True)]
    seen_gaps = set()
    for seed in range(20):
        segs = plant_repeats(text, spans, nl, random.Random(seed))
        ids = [t for s in segs for t in s.tokens]
        assert len(ids) == len(text) + 2 * sum(len(s) + 1 for s, _ in spans)
        plain = [t for s in segs if s.tokens[0] >= 1000 for t in s.tokens]
        assert plain == text  # nothing of the text lost or moved
        assert all(s.loss for s in segs if s.tokens[0] >= 1000)
        for span, first_loss in spans:
            copies = [i for i, s in enumerate(segs) if s.tokens == span]
            assert len(copies) == 2 and all(segs[i - 1].tokens == nl and not segs[i - 1].loss for i in copies)
            assert segs[copies[0]].loss == first_loss and segs[copies[1]].loss
            seen_gaps.add(copies[1] - copies[0])
    assert len(seen_gaps) > 2  # the distance between the copies varies


def test_lm_repeats_plant_spans_in_lm_windows(proc):
    """lm_repeats: each LM window holds planted repeats (its own text or random numbers and words) and
    stays within max_length; the record's text is covered as without them (shorter text windows)."""
    M = 160
    b0 = _builder(proc, "lm", max_length=M)
    b = _builder(proc, "lm", max_length=M, lm_repeats=2, copy_tokens=24)
    rec = {"text": TEXT * 6}
    plain, _ = b0.items(rec, random.Random(0), 0.0)
    planted, _ = b.items(rec, random.Random(0), 0.0)
    assert all(len(it) <= M for it in planted) and len(planted) > len(plain)
    newline = b.encode("\n")
    n_repeat = 0
    for it in planted:
        ids = list(it.sample.input_ids)
        assert set(it.sample.kind) == {Kind.TEXT} and not it.sample.chunks
        for n in range(24, 7, -1):  # a span of n tokens after a line break, found again later
            if any(ids[i : i + len(newline)] == newline and ids[i : i + len(newline) + n] in
                   [ids[j : j + len(newline) + n] for j in range(i + n + 1, len(ids) - n)]
                   for i in range(len(ids) - n)):
                n_repeat += 1
                break
    assert n_repeat >= len(planted) // 2
    with pytest.raises(ValueError, match="lm_repeats"):
        stage_preset("olm", lm_repeats=1.0)
