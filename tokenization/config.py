"""Config sections owned by `tokenization/`: the corpus, the tokenizer, and the shard format."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Where the corpus is and how documents are read from it."""

    paths: list[str] = Field(
        default_factory=list,
        description="Files, directories or globs of the corpus, or 'stdlib:' (this Python's standard library "
        "sources); one path may be given alone (data.paths=/data/corpus).",
    )
    root: str | None = Field(None, description="Corpus root for stable document ids; default: common parent.")
    text_field: str = Field("text", description="JSON field / parquet column holding the document text.")
    txt_split: Literal["file", "blank_lines"] = Field(
        "file", description="A .txt file is one document, or split into documents on blank lines."
    )
    on_bad_record: Literal["skip", "fail"] = Field(
        "skip",
        description="A malformed JSON line, or a record / parquet row without a string text_field: skip and "
        "count it (in the shards' manifest.json), or fail naming the file and line / row.",
    )
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="Share of documents routed to validation.")
    unit_bytes: int = Field(
        16 << 20, gt=0, description="Work unit size: small files are grouped and large ones cut to about this size."
    )
    batch_bytes: int = Field(
        1 << 20,
        gt=0,
        description="Text encoded per sentencepiece call and per Arrow batch, counted in characters (bytes "
        "for ASCII text).",
    )

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_alone(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class TokenizerConfig(_Strict):
    """The sentencepiece model trained on a deterministic sample of the corpus."""

    vocab_size: int = Field(4096, ge=64, description="Vocabulary size including reserved ids.")
    model_type: Literal["bpe", "unigram"] = Field("bpe", description="sentencepiece algorithm.")
    sample_bytes: int = Field(32 << 20, gt=0, description="Bytes of corpus text sampled for training.")
    seed: int = Field(0, description="Seed of the training sample.")
    max_sentence_bytes: int = Field(
        4096, ge=256, description="Training text is cut into pieces of at most this size (at line ends)."
    )
    num_threads: int = Field(
        2, ge=1, description="sentencepiece training threads (the trained model depends on it: keep it fixed)."
    )
