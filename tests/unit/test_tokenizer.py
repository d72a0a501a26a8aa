"""The sentencepiece tokenizer: lossless round trips, reserved ids, deterministic training, hash check."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from pipeline.data_stages import train_tokenizer
from tokenization.config import DataConfig, TokenizerConfig
from tokenization.tokenizer import EOD_ID, PAD_ID, TokenizerError, load_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DATA = DataConfig(paths=[str(STDLIB / "json"), str(STDLIB / "email")], unit_bytes=64 << 10)
CONFIG = TokenizerConfig(vocab_size=400, sample_bytes=256 << 10)

ROUND_TRIPS = {
    "newlines": "a\nb\n\n\nc\r\nd\n",
    "tabs": "\tx\t\ty\t",
    "runs of spaces": "  leading    inner      trailing   ",
    "emoji": "ok 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "cjk": "日本語のテキスト 中文文本 한국어",
    "mixed code": "def f(x):\n\tif x:  # 注释\n        return '😀'\n",
    "control and rare": "\x00\x01 \u200b zero width \ufeff bom \U0010ffff",
    "only whitespace": " \n\t \n",
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(DATA, CONFIG, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_decode_of_encode_is_identity(tokenizer_dir: Path, name: str) -> None:
    processor, _ = load_tokenizer(tokenizer_dir)
    text = ROUND_TRIPS[name]
    ids = processor.encode(text)
    assert processor.decode(ids) == text
    assert EOD_ID not in ids and PAD_ID not in ids and processor.unk_id() not in ids


def test_round_trip_on_real_source_files(tokenizer_dir: Path) -> None:
    processor, _ = load_tokenizer(tokenizer_dir)
    texts = [path.read_text() for path in sorted((STDLIB / "asyncio").glob("*.py"))]
    assert [processor.decode(ids) for ids in processor.encode(texts)] == texts


def test_reserved_ids_and_tokenizer_json(tokenizer_dir: Path) -> None:
    processor, info = load_tokenizer(tokenizer_dir)
    record = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert (record["eod_id"], record["pad_id"], record["vocab_size"]) == (0, 1, 400)
    assert record["model_sha256"] == info.model_sha256 and len(info.model_sha256) == 64
    assert processor.eos_id() == 0 and processor.pad_id() == 1 and processor.vocab_size() == 400
    assert processor.id_to_piece(0) == "<eod>" and processor.is_control(0) and processor.is_control(1)


def test_training_is_deterministic(tokenizer_dir: Path, tmp_path: Path) -> None:
    again = train_tokenizer(DATA, CONFIG, tmp_path / "again")
    assert (again / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_sample_size_comes_from_config(tmp_path: Path) -> None:
    from pipeline.data_stages import sample_text

    small = sample_text(DATA, CONFIG.model_copy(update={"sample_bytes": 20_000}))
    large = sample_text(DATA, CONFIG.model_copy(update={"sample_bytes": 200_000}))
    small_bytes, large_bytes = (sum(len(piece.encode()) for piece in sample) for sample in (small, large))
    assert 20_000 <= small_bytes < 120_000 and large_bytes >= 200_000
    assert all(len(piece.encode()) <= CONFIG.max_sentence_bytes for piece in large)


def test_a_changed_model_is_refused(tokenizer_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tok"
    copy.mkdir()
    (copy / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (copy / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes() + b"\0")
    with pytest.raises(TokenizerError, match="tokenizer.model: sha256"):
        load_tokenizer(copy)


def test_too_small_a_vocab_is_named(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.vocab_size=100"):
        train_tokenizer(DATA, CONFIG.model_copy(update={"vocab_size": 100}), tmp_path)


def test_a_sample_too_small_for_the_vocab_or_empty_is_named_and_not_retried(tmp_path: Path) -> None:
    from tokenization.tokenizer import TokenizerTrainingError, train_sentencepiece

    config = CONFIG.model_copy(update={"vocab_size": 4096})
    with pytest.raises(TokenizerTrainingError, match=r"tokenizer.vocab_size=4096 is more than .* \(at most \d+ pieces"):
        train_sentencepiece(["def f(x):\n    return x\n"] * 20, config, tmp_path / "small")
    with pytest.raises(TokenizerTrainingError, match="holds no text") as empty:
        train_sentencepiece([], config, tmp_path / "empty")
    assert empty.value.retryable is False


def test_a_sample_of_records_without_the_text_field_says_so(tmp_path: Path) -> None:
    """Not 'every document is empty': the records were skipped, and data.text_field is the fix."""
    from tokenization.tokenizer import TokenizerTrainingError

    corpus = tmp_path / "posts.jsonl"
    corpus.write_text("".join(json.dumps({"content": f"post {i}"}) + "\n" for i in range(60)) + "{broken\n")
    with pytest.raises(TokenizerTrainingError) as skipped:
        train_tokenizer(DataConfig(paths=[str(corpus)]), CONFIG, tmp_path / "tok")
    message = str(skipped.value)
    assert "all 61 records read were skipped (60 without a string field 'text' and 1 malformed JSON" in message
    assert f"e.g. in {corpus}" in message and "set data.text_field" in message
    assert skipped.value.retryable is False


def test_a_sample_drops_ids_past_the_tokenizers_pieces(tokenizer_dir: Path) -> None:
    """The head's rows are padded past the tokenizer (to a multiple of 128); an untrained model samples
    those ids, which sentencepiece cannot decode. `rwkv-pipeline generate` and the eval report share this."""
    import torch

    from model import ModelConfig, build_model, generate
    from pipeline.eval_stage import sample

    model = build_model(ModelConfig(n_layer=1, n_embd=32, vocab_size=512, wkv_backend="torch")).eval()
    with torch.no_grad():
        model.head.weight.zero_()  # every id equally likely
    processor, _ = load_tokenizer(tokenizer_dir)
    drawn = generate(model, processor.encode("def "), 32, top_p=1.0, seed=3, stop_token=EOD_ID)
    assert any(token >= CONFIG.vocab_size for token in drawn)  # the case this is about
    with pytest.raises(IndexError):  # what decoding them unfiltered did
        processor.decode(drawn)
    text = sample(model, tokenizer_dir, "def ", 32, top_p=1.0, seed=3)
    assert text.startswith("def ") and len(text) > len("def ")
