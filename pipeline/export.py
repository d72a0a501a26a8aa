"""A trained model as the official RWKV-4 checkpoint: pure compute, no Ray or MLflow.

    export(model, Path("runs/q/tokenizer-5e6f"), Path("exported"), model_cfg)

Writes `model.pth` (the `rwkv` package loads it), the same weights as `model.safetensors`, the
tokenizer beside them, and `export.json` with each file's size and sha256.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from model import ModelConfig, save_rwkv4_pth, save_rwkv4_safetensors
from tokenization.shards import sha256_file

EXPORTED_FILES = ("model.pth", "model.safetensors", "tokenizer.model", "tokenizer.json")
EXPORT_RECORD = "export.json"  # the files' sizes and sha256, the model config, how to load it


def export(model: torch.nn.Module, tokenizer_dir: Path, out_dir: Path, model_cfg: ModelConfig | None = None) -> dict:
    """model.pth (official RWKV-4), model.safetensors, tokenizer.model/.json and export.json; returns the
    export.json record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_rwkv4_pth(model, out_dir / "model.pth")
    save_rwkv4_safetensors(model, out_dir / "model.safetensors")
    for name in ("tokenizer.model", "tokenizer.json"):
        shutil.copy2(Path(tokenizer_dir) / name, out_dir / name)
    files = {
        name: {"bytes": (out_dir / name).stat().st_size, "sha256": sha256_file(out_dir / name)}
        for name in EXPORTED_FILES
    }
    record = {
        "format": "rwkv4-official",
        "files": files,
        "model_config": model_cfg.__dict__ if model_cfg is not None else None,
        "load_with": "rwkv.model.RWKV(model='model.pth', strategy='cpu fp32')",
    }
    (out_dir / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
