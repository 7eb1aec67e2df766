"""``vist2 tokenizer train`` and ``vist2 init`` size flags: a small vocabulary, a nano model, the whole pipeline."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from vist2.cli import main, sample_text
from vist2.config import VIST2Config

NANO = ["--llm-hidden-size", "128", "--llm-layers", "4", "--llm-heads", "4", "--llm-kv-heads", "2",
        "--llm-intermediate-size", "384", "--vision-hidden-size", "128", "--vision-layers", "4",
        "--vision-heads", "4", "--vision-intermediate-size", "384"]
TRICKY = "In  the\tbeginning\n\n第一回 甄士隐梦幻识通灵\r\n  émigré 🙂 end "


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The formats vist2 train reads: a .txt, and a jsonl of a document, a caption and a chat."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "en.txt").write_text(sample_text("en"), encoding="utf-8")
    recs = [{"text": sample_text("zh")}, {"image": "x.png", "caption": "a red square on white"},
            {"messages": [{"role": "user", "content": "Where is this from?"},
                          {"role": "assistant", "content": "<think>\nGenesis.\n</think>\n\nGenesis 1."}]}]
    (d / "mixed.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    assert main(["tokenizer", "train", "--data", str(corpus / "en.txt"), str(corpus / "mixed.jsonl"),
                 "--vocab-size", "512", "--out", str(out)]) == 0
    return out


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == 512
    for text in (TRICKY, sample_text("zh")[:300], sample_text("en")[:300], "\n\n\n", " "):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok(sample_text("en"), add_special_tokens=False)["input_ids"]) < len(sample_text("en").encode()) / 2
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    for i, s in enumerate(specials):
        assert tok(f"a{s}b", add_special_tokens=False)["input_ids"][1] == i  # one id, the same in every folder
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.decode([3, 2], skip_special_tokens=True) == "<think>"  # <think> is text, <|im_end|> is not


def test_tokenizer_chat_template_splits_like_the_engine(tok_dir):
    from vist2.chat import chat_prompt

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    prefix, query, suffix, _ = chat_prompt(tok, [{"role": "user", "content": "Where is 第一回?"}])
    assert tok.decode(prefix) == "<|im_start|>user\n" and tok.decode(query) == "Where is 第一回?"
    assert tok.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_errors_name_the_flag(corpus, tmp_path, capsys):
    assert main(["tokenizer", "train", "--data", str(corpus / "en.txt"), "--vocab-size", "100",
                 "--out", str(tmp_path / "t")]) == 2
    assert "--vocab-size must be at least 261" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--data", str(tmp_path / "nope.txt"), "--vocab-size", "512",
                 "--out", str(tmp_path / "t")]) == 2
    assert "--data" in capsys.readouterr().err


def test_init_nano_is_one_command(tok_dir, tmp_path):
    out = tmp_path / "nano"
    assert main(["init", "--preset", "tiny", "--tokenizer", str(tok_dir), *NANO, "--out", str(out)]) == 0
    c = VIST2Config.from_pretrained(str(out))
    t, v = c.text_config, c.vision_config
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.head_dim) == (512, 128, 4, 4, 2, 384, 32)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (128, 4, 4, 384)
    assert (t.eos_token_id, t.pad_token_id, t.bos_token_id) == (2, 0, 0)  # the tokenizer's, not Qwen3's
    assert len(AutoTokenizer.from_pretrained(str(out))) == t.vocab_size
    # --vocab-size overrides the tokenizer's length (never below it)
    assert main(["init", "--preset", "tiny", "--tokenizer", str(tok_dir), "--vocab-size", "576",
                 "--out", str(tmp_path / "pad")]) == 0
    assert VIST2Config.from_pretrained(str(tmp_path / "pad")).text_config.vocab_size == 576


def test_init_nano_geometry_reads_two_characters_per_patch(tok_dir, tmp_path):
    """--render nano with --vision-patch-size 8: 8x8 patches over 4x8 px cells, a 4x4 merge, r kept at 4,
    and one position embedding per patch."""
    out = tmp_path / "nano7"
    assert main(["init", "--preset", "tiny", "--tokenizer", str(tok_dir), "--render", "nano",
                 "--vision-patch-size", "8", "--out", str(out)]) == 0
    c = VIST2Config.from_pretrained(str(out))
    assert (c.patch_size, c.merge, c.patch_grid, c.vision_config.num_patches) == (8, 4, (16, 16), 256)
    assert (c.n_visual, c.chunk_tokens, c.compression_ratio) == (16, 64, 4.0)


@pytest.mark.parametrize("flags, message", [
    (["--llm-heads", "3"], "--llm-heads 3 must divide --llm-hidden-size 64"),
    (["--llm-kv-heads", "3"], "--llm-kv-heads 3 must divide --llm-heads 4"),
    (["--vision-hidden-size", "48", "--vision-heads", "5"], "--vision-heads 5 must divide --vision-hidden-size 48"),
    (["--llm-layers", "0"], "--llm-layers must be a positive integer"),
    (["--vocab-size", "300"], "--vocab-size 300 is smaller than the tokenizer (512 tokens)"),
])
def test_init_size_errors_name_the_flag(flags, message, tok_dir, tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--tokenizer", str(tok_dir), *flags, "--out", str(tmp_path / "m")]) == 2
    assert message in capsys.readouterr().err


def test_size_flags_need_a_preset(qwen3_dir, siglip2_dir, tmp_path, capsys):
    assert main(["init", "--llm", str(qwen3_dir), "--vision", str(siglip2_dir), "--llm-layers", "2",
                 "--out", str(tmp_path / "m")]) == 2
    assert "--llm-layers: size flags apply to --preset" in capsys.readouterr().err


def test_pipeline_runs_with_the_small_tokenizer(tok_dir, corpus, tmp_path, capsys):
    """init -> one OCR step -> generate, all on the 512-word tokenizer."""
    model = tmp_path / "nano"
    assert main(["init", "--preset", "tiny", "--tokenizer", str(tok_dir), *NANO, "--out", str(model)]) == 0
    assert main(["train", "--stage", "ocr", "--model", str(model), "--data", str(corpus / "en.txt"),
                 "--eval-data", str(corpus / "mixed.jsonl"), "--out", str(tmp_path / "ocr"), "--max-steps", "1",
                 "--max-length", "640", "--num-workers", "0",
                 "--no-progress"]) == 0
    capsys.readouterr()
    from vist2.modeling import VIST2ForCausalLM

    trained = VIST2ForCausalLM.from_pretrained(str(tmp_path / "ocr"))
    assert trained.lm_head.weight.shape == (512, 128)
    summary = json.loads((tmp_path / "ocr" / "train_summary.json").read_text())
    assert summary["steps"] == 1 and 0 < summary["last_loss"] < 2 * torch.log(torch.tensor(512.0)).item()
    assert main(["generate", "--model", str(tmp_path / "ocr"), "--prompt", sample_text("en")[:400],
                 "--max-new-tokens", "70", "--ignore-eos"]) == 0
    err = capsys.readouterr().err
    assert "generated 70" in err and "chunks compressed" in err
