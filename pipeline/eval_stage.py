"""Evaluate a trained model: pure compute, no Ray or MLflow (the export is pipeline/export.py).

    model = load_trained(Path("runs/q/pretrain-1a2b/final_weights.pt"), ModelConfig(vocab_size=4096))
    report = evaluate(model, Path("runs/q/tokenize-3c4d"), Path("runs/q/tokenizer-5e6f"),
                      EvalConfig(batches=4), ctx_len=128, out_dir=Path("out"))

`evaluate` writes eval_report.json (val loss, perplexity, tokens, a generated sample) and
loss_vs_position.png + .csv: the mean loss at each position of a window, which shows whether
the model uses its context (it should fall with position, and keep falling past the training
length after a context extension). `sample` is the RNN-mode text sample, also behind `rwkv-pipeline
generate`.

Legend: B windows in a batch, T ctx_len, V vocab.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model import RWKV, ModelConfig, build_model, generate
from pipeline.config import EvalConfig
from pipeline.plots import line_chart
from tokenization.dataset import TokenDataset

EVAL_MICRO_BSZ = 4
REPORT_FILES = ("eval_report.json", "loss_vs_position.png", "loss_vs_position.csv")  # what `evaluate` writes


def load_trained(weights: Path, model_cfg: ModelConfig) -> torch.nn.Module:
    """The training stage's final_weights.pt (our parameter names, fp32) in a fresh model, eval mode."""
    model = build_model(model_cfg)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def loss_by_position(model: torch.nn.Module, data: TokenDataset, ctx_len: int, windows: int) -> np.ndarray:
    """Mean next-token loss at each of the ctx_len positions over `windows` evenly spread windows (T,)."""
    starts = data.spread_starts(ctx_len + 1, windows)
    totals_T = torch.zeros(ctx_len, dtype=torch.float64)
    for first in range(0, windows, EVAL_MICRO_BSZ):
        batch = np.stack([data.window(start, ctx_len + 1) for start in starts[first : first + EVAL_MICRO_BSZ]])
        tokens_BT = torch.from_numpy(batch)
        logits_BTV = model(tokens_BT[:, :-1]).float()
        losses_BT = F.cross_entropy(logits_BTV.transpose(1, 2), tokens_BT[:, 1:], reduction="none")
        totals_T += losses_BT.double().sum(0)
    return (totals_T / windows).numpy()


def sample(
    model: torch.nn.Module,
    tokenizer_dir: Path,
    prompt: str,
    tokens: int,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int = 0,
) -> str:
    """`prompt` and its RNN-mode continuation (up to `tokens` tokens, to the end of the document), as text.

    Ids past the tokenizer's pieces (the head's rows padded to a multiple of 128) are dropped: sentencepiece
    cannot decode them, and a barely trained model may sample one."""
    from tokenization.tokenizer import load_tokenizer

    processor, info = load_tokenizer(tokenizer_dir)
    prompt_ids = processor.encode(prompt) or [info.eod_id]
    new_ids = generate(model, prompt_ids, tokens, temperature, top_p, seed, stop_token=info.eod_id)
    return prompt + processor.decode([t for t in new_ids if t != info.eod_id and t < processor.get_piece_size()])


def evaluate(
    model: torch.nn.Module,
    shard_dir: Path,
    tokenizer_dir: Path,
    cfg: EvalConfig,
    ctx_len: int,
    out_dir: Path,
    trained_ctx: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Val loss, perplexity, loss vs position (PNG + CSV) and a sample; returns the report it writes.

    trained_ctx: each training stage's context length ({"pretrain": 1024, "extend1": 4096}), marked on
    the plot; past the longest of them the report also gives the mean loss there (`loss_past_trained_ctx`),
    the figure that says whether the model uses context it was not trained on.
    """
    trained_ctx = dict(trained_ctx or {})
    samples = cfg.sample_tokens > 0 and isinstance(model, RWKV)
    data = TokenDataset(shard_dir, split="val")  # verified first: a damaged shard leaves no empty report folder
    out_dir.mkdir(parents=True, exist_ok=True)
    windows = cfg.batches * EVAL_MICRO_BSZ
    by_position_T = loss_by_position(model, data, ctx_len, windows)
    val_loss = float(by_position_T.mean())
    positions = list(range(1, ctx_len + 1))
    np.savetxt(
        out_dir / "loss_vs_position.csv",
        np.stack([positions, by_position_T], 1),
        delimiter=",",
        header="position,loss",
        comments="",
        fmt=["%d", "%.6f"],
    )
    smooth = max(1, ctx_len // 16)  # average neighbouring positions so the trend is visible
    kernel = np.ones(smooth) / smooth
    title = f"val loss vs position (ctx {ctx_len})" + (
        f", each point the mean of {smooth} neighbouring positions" if smooth > 1 else ""
    )
    line_chart(
        {"loss": ([float(p) for p in positions[smooth - 1 :]], list(np.convolve(by_position_T, kernel, mode="valid")))},
        "token position",
        "mean loss (nats)",
        title,
        out_dir / "loss_vs_position.png",
        markers={f"{stage} ctx {length}": length for stage, length in trained_ctx.items() if length < ctx_len},
    )
    report = {
        "val_loss": val_loss,
        "perplexity": float(np.exp(val_loss)),
        "ctx_len": ctx_len,
        "windows": windows,
        "tokens": windows * ctx_len,
        "loss_first_quarter": float(by_position_T[: max(1, ctx_len // 4)].mean()),
        "loss_last_quarter": float(by_position_T[-max(1, ctx_len // 4) :].mean()),
        "trained_ctx": trained_ctx,
        "prompt": cfg.sample_prompt,
        # sampled in RNN mode, which the GPT baseline does not have
        "sample": sample(model, tokenizer_dir, cfg.sample_prompt, cfg.sample_tokens) if samples else "",
    }
    longest = max(trained_ctx.values(), default=ctx_len)
    if longest < ctx_len:  # what the model does past what it learned, beside what it does within it
        report["loss_past_trained_ctx"] = float(by_position_T[longest:].mean())
        report["loss_within_trained_ctx"] = float(by_position_T[:longest].mean())
    (out_dir / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
