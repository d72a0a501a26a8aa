"""Export and import of the official RWKV-4 checkpoint: a flat fp32 state dict (reference/rwkv4.md §7.2).

The `.pth` written here loads in the `rwkv` inference package; the same dict can be written as
`model.safetensors`. Import checks the file is RWKV-4 before building anything and raises a
`CheckpointFormatError` listing every problem (keys of RWKV-5/6/7, missing keys, unexpected keys,
wrong shapes). Sizes are inferred from tensor shapes as the `rwkv` package does: n_embd and vocab
from emb.weight, dim_att from blocks.0.att.key.weight, dim_ffn from blocks.0.ffn.key.weight,
n_layer = 1 + the largest block index. Loading never unpickles objects (weights_only=True).

Caveat: `rwkv` 0.8.32's multi-token CPU path (att_seq) writes the WKV output into an (T, n_embd)
buffer, so it fails on models with dim_att != n_embd; keep dim_att = n_embd for models meant for
that package. Our own import handles any dim_att.

    >>> from model import ModelConfig, RWKV, load_rwkv4_pth, save_rwkv4_pth
    >>> save_rwkv4_pth(RWKV(ModelConfig(n_layer=2, n_embd=32, vocab_size=50)), "/tmp/tiny.pth")
    >>> net = load_rwkv4_pth("/tmp/tiny.pth", wkv_backend="reference")
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig
from model.rwkv import RWKV

StateDict = dict[str, torch.Tensor]

# Key fragments that only later RWKV generations have; the `rwkv` package keys its version on these.
LATER_VERSION_MARKERS = {
    "ln_x": "RWKV-5/6/7",
    "gate.weight": "RWKV-5.1+",
    "time_maa": "RWKV-6",
    "time_faaaa": "RWKV-5/6",
    "time_state": "RWKV-5/6 state tuning",
    "att.w0": "RWKV-7",
    "att.a0": "RWKV-7",
    "att.k_k": "RWKV-7",
    "att.r_k": "RWKV-7",
    "att.x_r": "RWKV-7",
    "_strategy": "rwkv-package pre-converted file",
}
MAX_LISTED = 20
BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


class CheckpointFormatError(ValueError):
    """The file is not an RWKV-4 checkpoint in the official layout; the message lists why."""


def official_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-4 export with its shape (time_mix as (1, 1, C), as the reference saves it)."""
    n_embd, dim_att, dim_ffn, vocab = config.n_embd, config.dim_att, config.dim_ffn, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (vocab, n_embd)}
    for i in range(config.n_layer):
        norms = ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")
        shapes |= {f"blocks.{i}.{ln}.{p}": (n_embd,) for ln in norms for p in ("weight", "bias")}
        att, ffn = f"blocks.{i}.att", f"blocks.{i}.ffn"
        shapes |= {f"{att}.time_decay": (dim_att,), f"{att}.time_first": (dim_att,)}
        shapes |= {f"{att}.time_mix_{x}": (1, 1, n_embd) for x in "kvr"}
        shapes |= {f"{att}.{m}.weight": (dim_att, n_embd) for m in ("key", "value", "receptance")}
        shapes[f"{att}.output.weight"] = (n_embd, dim_att)
        shapes |= {f"{ffn}.time_mix_{x}": (1, 1, n_embd) for x in "kr"}
        shapes |= {f"{ffn}.key.weight": (dim_ffn, n_embd), f"{ffn}.receptance.weight": (n_embd, n_embd)}
        shapes[f"{ffn}.value.weight"] = (n_embd, dim_ffn)
    shapes |= {"ln_out.weight": (n_embd,), "ln_out.bias": (n_embd,), "head.weight": (vocab, n_embd)}
    return shapes


def is_time_mix(key: str) -> bool:
    return ".time_mix_" in key


def export_state_dict(source: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    """The official flat dict: float32, contiguous, CPU, time_mix reshaped to (1, 1, C).

    `source` is an RWKV or its `state_dict()` (e.g. gathered from a sharded training engine).
    """
    if isinstance(source, nn.Module):
        if not isinstance(source, RWKV):
            raise TypeError(f"only RWKV-4 models export to the RWKV-4 format, got {type(source).__name__}")
        source = source.state_dict()
    exported = {}
    for key, tensor in source.items():
        tensor = tensor.detach().to("cpu", torch.float32)
        exported[key] = (tensor.reshape(1, 1, -1) if is_time_mix(key) else tensor).contiguous().clone()
    problems = format_problems(exported)
    if problems:
        raise CheckpointFormatError("cannot export as RWKV-4:\n  " + "\n  ".join(problems))
    return exported


def listed(items: list[str]) -> str:
    more = f", ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def infer_config(state: Mapping[str, torch.Tensor], wkv_backend: str = "auto") -> ModelConfig:
    """Sizes from tensor shapes, as the `rwkv` package infers them; assumes the size keys are present."""
    vocab, n_embd = state["emb.weight"].shape
    n_layer = 1 + max(int(m.group(1)) for key in state if (m := BLOCK_INDEX.match(key)))
    return ModelConfig(
        arch="rwkv4",
        n_layer=n_layer,
        n_embd=n_embd,
        dim_att=state["blocks.0.att.key.weight"].shape[0],
        dim_ffn=state["blocks.0.ffn.key.weight"].shape[0],
        vocab_size=vocab,
        wkv_backend=wkv_backend,  # type: ignore[arg-type]
    )


def format_problems(state: Mapping[str, object]) -> list[str]:
    """Everything that keeps `state` from being an RWKV-4 checkpoint; empty when it is one."""
    problems = []
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point()]
    if not_tensors:
        problems.append(f"entries that are not float tensors ({len(not_tensors)}): {listed(not_tensors)}")
    later = [f"{k} ({v})" for k in state for marker, v in LATER_VERSION_MARKERS.items() if marker in k]
    if later:
        problems.append(f"keys of a later RWKV version ({len(later)}): {listed(later)}")
    size_keys = ("emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight")
    unusable = [k for k in size_keys if not isinstance(state.get(k), torch.Tensor) or state[k].dim() != 2]
    if unusable:
        problems.append(f"missing keys needed to infer the sizes ({len(unusable)}): {listed(unusable)}")
        problems.append(f"keys found ({len(state)}): {listed(list(state))}")  # shows e.g. a wrapper prefix
        return problems
    expected = official_shapes(infer_config(state))  # type: ignore[arg-type]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} expected {expected[k]}"  # type: ignore[union-attr]
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and not shape_matches(k, state[k].shape, expected[k])
    ]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            problems.append(f"{label} ({len(items)}): {listed(items)}")
    return problems


def shape_matches(key: str, shape: torch.Size, expected: tuple[int, ...]) -> bool:
    # the `rwkv` package squeezes every time_* tensor, so (C,) time_mix is accepted on import too
    return tuple(shape) == expected or (is_time_mix(key) and tuple(shape) == expected[-1:])


def model_from_state_dict(state: Mapping[str, object], wkv_backend: str = "auto", source: str = "") -> RWKV:
    """An RWKV (float32, CPU) holding `state`; raises CheckpointFormatError listing every problem."""
    problems = format_problems(state)
    if problems:
        where = f" {source}" if source else ""
        raise CheckpointFormatError(f"not an RWKV-4 checkpoint{where}:\n  " + "\n  ".join(problems))
    tensors: Mapping[str, torch.Tensor] = state  # type: ignore[assignment]
    config = infer_config(tensors, wkv_backend)
    with torch.device("meta"):  # no init: every parameter comes from the file
        model = RWKV(config)
    ours = {k: (v.reshape(-1) if is_time_mix(k) else v).to(torch.float32).contiguous() for k, v in tensors.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    return model


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write to a temporary sibling and rename, so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (safetensors' writer makes files 0600)
    os.replace(tmp, path)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets while it reads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_rwkv4_pth(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """The official RWKV-4 `.pth`: loadable by `rwkv.model.RWKV(model=path, strategy='cpu fp32')`."""
    state = export_state_dict(model)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_rwkv4_pth(path: str | os.PathLike, wkv_backend: str = "auto") -> RWKV:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise CheckpointFormatError(
            f"not an RWKV-4 checkpoint {path}: expected a flat dict, got {type(state).__name__}"
        )
    return model_from_state_dict(state, wkv_backend, source=str(path))


def save_rwkv4_safetensors(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """The same flat dict as `save_rwkv4_pth`, as a safetensors file (e.g. model.safetensors)."""
    from safetensors.torch import save_file

    state = export_state_dict(model)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "architecture": "rwkv4"}))


def load_rwkv4_safetensors(path: str | os.PathLike, wkv_backend: str = "auto") -> RWKV:
    from safetensors.torch import load_file

    return model_from_state_dict(load_file(str(path)), wkv_backend, source=str(path))
