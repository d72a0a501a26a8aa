"""The sentencepiece tokenizer: training on a text sample, the reserved ids, loading with a hash check.

    info = train_sentencepiece(["def f(x):\\n    return x\\n"] * 200, TokenizerConfig(vocab_size=300), Path("tok"))
    processor, info = load_tokenizer(Path("tok"))
    processor.decode(processor.encode("a\\tb  c 😀")) == "a\\tb  c 😀"

The model is lossless: identity normalisation, no dummy prefix, whitespace kept, and byte fallback,
so decode(encode(text)) == text for UTF-8 text (newlines, tabs, runs of spaces, emoji, CJK). The one
exception is U+2581 itself, the symbol sentencepiece uses for a space, which decodes as a space.

Reserved ids: 0 = end of document (sentencepiece's eos, appended after every document, as the
RWKV reference's binidx uses token 0), 1 = padding, 2 = unknown (never produced with byte
fallback). `tokenizer.json` beside `tokenizer.model` records them, the vocab size and the model's
sha256; loading verifies the hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenization.config import TokenizerConfig

MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"
EOD_ID, PAD_ID, UNK_ID = 0, 1, 2
_MIN_VOCAB = 256 + 3 + 1  # byte fallback pieces + reserved ids + at least one learned piece


class TokenizerError(ValueError):
    """A tokenizer directory that is missing, incomplete or does not match its recorded hash."""


class TokenizerTrainingError(TokenizerError):
    """sentencepiece cannot train on this sample with this config (the message names the field)."""

    retryable = False  # the same sample and config fail the same way (orchestration/dag.py)


@dataclass(frozen=True)
class TokenizerInfo:
    model_sha256: str
    vocab_size: int
    eod_id: int
    pad_id: int
    unk_id: int
    model_type: str
    config: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def write_atomic(path: Path, payload: bytes) -> None:
    """Write under a unique temporary name, then rename: readers never see a partial file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def trainer_options(config: TokenizerConfig) -> dict[str, Any]:
    """sentencepiece options that make the model lossless and deterministic."""
    return dict(
        vocab_size=config.vocab_size,
        model_type=config.model_type,
        normalization_rule_name="identity",  # no NFKC: decode must give back the exact text
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # indentation runs become single pieces
        byte_fallback=True,  # any character outside the vocab is spelled as UTF-8 bytes
        split_digits=False,
        eos_id=EOD_ID,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        eos_piece="<eod>",
        max_sentence_length=config.max_sentence_bytes,
        input_sentence_size=0,  # use the whole sample: sampling is ours and deterministic
        shuffle_input_sentence=False,
        num_threads=config.num_threads,  # the learned merges depend on it, so it is config, not os.cpu_count()
        minloglevel=2,
    )


def train_sentencepiece(sentences: Iterable[str], config: TokenizerConfig, out_dir: Path) -> TokenizerInfo:
    """Train on `sentences`, write tokenizer.model and tokenizer.json into out_dir."""
    import sentencepiece as spm

    if config.vocab_size < _MIN_VOCAB:
        raise TokenizerError(f"tokenizer.vocab_size={config.vocab_size}: byte fallback needs at least {_MIN_VOCAB}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **trainer_options(config))
    except RuntimeError as exc:
        raise TokenizerTrainingError(_training_failure(str(exc), config)) from None
    payload = model.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=payload)
    info = TokenizerInfo(
        model_sha256=hashlib.sha256(payload).hexdigest(),
        vocab_size=processor.vocab_size(),
        eod_id=processor.eos_id(),
        pad_id=processor.pad_id(),
        unk_id=processor.unk_id(),
        model_type=config.model_type,
        config=config.model_dump(mode="json"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / MODEL_FILE, payload)
    write_atomic(out_dir / INFO_FILE, info.to_json().encode())
    return info


def _training_failure(message: str, config: TokenizerConfig) -> str:
    """sentencepiece's reason in the terms of our config."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (
            f"tokenizer.vocab_size={config.vocab_size} is more than the corpus sample can give (at most "
            f"{too_high.group(2)} pieces from {config.sample_bytes} sample bytes): lower tokenizer.vocab_size, or "
            "give the corpus more text"
        )
    if "sentences_.empty()" in message:
        return "the corpus sample for the tokenizer holds no text: every document in data.paths is empty"
    return f"sentencepiece training failed (tokenizer.* config or too small a sample): {message}"


def read_info(tokenizer_dir: Path) -> TokenizerInfo:
    path = Path(tokenizer_dir) / INFO_FILE
    if not path.is_file():
        raise TokenizerError(f"{path} not found: train the tokenizer first")
    return TokenizerInfo(**json.loads(path.read_text()))


def load_tokenizer(tokenizer_dir: Path):  # -> tuple[spm.SentencePieceProcessor, TokenizerInfo]
    """The processor and its info; raises TokenizerError when the model's sha256 differs from the record."""
    import sentencepiece as spm

    info = read_info(tokenizer_dir)
    path = Path(tokenizer_dir) / MODEL_FILE
    if not path.is_file():
        raise TokenizerError(f"{path} not found")
    payload = path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != info.model_sha256:
        raise TokenizerError(f"{path}: sha256 {digest[:12]} differs from {INFO_FILE} ({info.model_sha256[:12]})")
    return spm.SentencePieceProcessor(model_proto=payload), info
