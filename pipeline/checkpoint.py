"""Training checkpoints: DeepSpeed state plus our own `train_state.json`, complete only when marked.

One checkpoint is one directory, `<root>/step_00000100/`:

    mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   DeepSpeed (weights, optimizer)
    rng_rank_00000.json ...                                        each rank's RNG states
    files_rank_00000.json ...                                      each rank's list of the files, sizes
    train_state.json                                               step, tokens seen, sampler position,
                                                                   tracking run id, parameter shapes,
                                                                   the recent metric reports (train.py)
    COMPLETE                                                       written last, by rank 0

    save(engine, ckpt_dir, state)          # every rank; collective
    latest = latest_complete(root)         # None when there is none
    latest = agreed_latest_complete(root)  # the same, rank 0's choice on every rank (collective)
    state = load(engine, latest, expected_shapes)   # raises CheckpointMismatch on another model config
    weights = consolidated_state_dict(latest)       # offline: full fp32 weights, any ZeRO stage/world
    export_rwkv4_pth(latest, "model.pth")           # the official RWKV-4 .pth from a training checkpoint

A checkpoint without COMPLETE (a crash while saving) is ignored by `latest_complete` and removed by
`prune`. Each rank also lists the folder's files and sizes (`files_rank_*.json`), so that a copy of
the folder can be checked whole (pipeline/checkpoint_files.py). Everything of ours is JSON, so reading
it never unpickles; the DeepSpeed files are read by DeepSpeed's own loader.

Another world size. DeepSpeed's own loader refuses ZeRO-1/2/3 optimizer shards written by a different
number of ranks (`ZeRORuntimeException: ... DP world size of 2 but the current world size is 1`).
DeepSpeed's maintained answer is the universal checkpoint: `deepspeed.checkpoint.ds_to_universal`
rewrites the shards as one folder per parameter (fp32 master weights, exp_avg, exp_avg_sq, step),
and an engine built with `{"checkpoint": {"load_universal": true}}` slices those into its own
partitioning. `to_universal` runs that converter (in-process, on rank 0) into scratch space beside
the run, and `load(..., universal=...)` reads from it; the checkpoint itself is never modified (under
Ray Train it is Ray's stored copy). ZeRO-0 checkpoints hold the whole optimizer state in
`mp_rank_00_model_states.pt`, so they load on any world size as they are. (DeepSpeed's older
`zero_optimization.elastic_checkpoint` is no way round it: in 0.19.8 `engine._load_zero_checkpoint`
raises on a DP-size change before the elastic path is reached, and it is deprecated for ZeRO-3.)

Consolidated weights come from `deepspeed.utils.zero_to_fp32` (DeepSpeed's offline merger of the
fp32 master partitions, ZeRO-1/2/3, any world size): no process group and no engine needed, so a
checkpoint written on 8 GPUs exports on a laptop.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.checkpoint_files import (
    COMPLETE,
    TRAIN_STATE,
    is_complete,
    list_checkpoints,
    write_file_list,
    write_json_atomic,
)

FORMAT_VERSION = 1


class CheckpointMismatch(ValueError):
    """A checkpoint this run cannot continue from: another model config (the message lists the
    mismatched shapes) or a global batch the new world size cannot keep."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states as JSON-safe values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Full shapes by name (ZeRO-3 partitions keep the full shape in `ds_shape`)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}


def check_shapes(saved: dict[str, list[int]], expected: dict[str, list[int]], where: Path) -> None:
    """Raise CheckpointMismatch naming every parameter whose shape differs, is missing or is extra."""
    problems = [
        f"  {name}: checkpoint {tuple(saved[name])} vs model {tuple(expected[name])}"
        for name in expected
        if name in saved and list(saved[name]) != list(expected[name])
    ]
    problems += [f"  {name}: missing from the checkpoint" for name in expected if name not in saved]
    problems += [f"  {name}: in the checkpoint but not in the model" for name in saved if name not in expected]
    if problems:
        raise CheckpointMismatch(
            f"checkpoint {where} was written by a different model config; mismatched parameters:\n"
            + "\n".join(problems)
            + "\nUse a fresh output directory, or the model config the checkpoint was trained with."
        )


def has_zero_shards(ckpt_dir: Path) -> bool:
    """Whether the optimizer state is partitioned per rank (ZeRO-1/2/3), i.e. tied to the world size."""
    return any(Path(ckpt_dir).glob("*zero_pp_rank_*_optim_states.pt"))


def latest_complete(root: Path) -> Path | None:
    complete = [p for p in list_checkpoints(root) if is_complete(p)]
    return complete[-1] if complete else None


def agreed_latest_complete(root: Path) -> Path | None:
    """Rank 0's `latest_complete(root)`, on every rank (collective when a process group is up).

    Ranks that each listed the folder could pick different checkpoints (a node-local folder on a
    multi-node run, a copy still arriving) and load different steps without noticing; with one choice,
    a rank that lacks it fails naming it (read_complete_state)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return latest_complete(root)
    choice = [str(latest_complete(root) or "") if _rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def save(engine: Any, ckpt_dir: Path, state: dict[str, Any]) -> None:
    """Write one checkpoint (collective: every rank calls it). COMPLETE is the last file written."""
    ckpt_dir = Path(ckpt_dir)
    rank = _rank()
    if rank == 0 and ckpt_dir.exists():  # leftovers of an earlier attempt at this step: start clean
        shutil.rmtree(ckpt_dir)
    _barrier()
    # DeepSpeed writes <save_dir>/<tag>/; tag = our directory name, and no 'latest' file (ours is COMPLETE).
    engine.save_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, save_latest=False)
    write_json_atomic(ckpt_dir / f"rng_rank_{rank:05d}.json", rng_state())
    _barrier()
    write_file_list(ckpt_dir, rank)  # what a copy of this folder must hold to be whole (is_intact)
    _barrier()
    if rank == 0:
        write_json_atomic(ckpt_dir / TRAIN_STATE, {"format": FORMAT_VERSION, **state})
        (ckpt_dir / COMPLETE).write_text("ok\n")
    _barrier()


def read_state(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / TRAIN_STATE).read_text())


def read_complete_state(ckpt_dir: Path, expected_shapes: dict[str, list[int]]) -> dict[str, Any]:
    """train_state of a complete checkpoint written for these parameter shapes (else a named error)."""
    ckpt_dir = Path(ckpt_dir)
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no {COMPLETE} or {TRAIN_STATE})")
    state = read_state(ckpt_dir)
    check_shapes(state["parameter_shapes"], expected_shapes, ckpt_dir)
    return state


def to_universal(ckpt_dir: Path, scratch: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal layout under `scratch`; collective.

    Rank 0 converts (DeepSpeed's `ds_to_universal`, in-process, one worker: no process pool), the
    others wait at a barrier, so `scratch` must be visible to every rank (one host, or a shared
    filesystem). Returns the folder to pass to `load(..., universal=...)`: `scratch/<step dir name>`.
    """
    ckpt_dir, scratch = Path(ckpt_dir), Path(scratch)
    target = scratch / ckpt_dir.name
    if _rank() == 0:
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(scratch, ignore_errors=True)  # leftovers of an interrupted conversion
        scratch.mkdir(parents=True)
        ds_to_universal.main(
            Namespace(
                input_folder=str(ckpt_dir),
                output_folder=str(target),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                # Our engines are plain data parallel: the converter's "universal checkpoint info"
                # (tensor/pipeline-parallel layout hints written by Megatron-style clients) is empty.
                inject_missing_state=True,
            )
        )
    _barrier()
    return target


def load(
    engine: Any, ckpt_dir: Path, expected_shapes: dict[str, list[int]], universal: Path | None = None
) -> dict[str, Any]:
    """Restore weights, optimizer and this rank's RNG from a complete checkpoint; returns train_state.

    universal: the `to_universal` conversion of `ckpt_dir`, for an engine built with
    `{"checkpoint": {"load_universal": true}}` (a world size other than the checkpoint's).
    """
    ckpt_dir = Path(ckpt_dir)
    state = read_complete_state(ckpt_dir, expected_shapes)
    source = Path(universal) if universal is not None else ckpt_dir
    # Our groups' hyperparameters (lr_scale, weight_decay, name), which come from the config, not the file.
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    load_path, _ = engine.load_checkpoint(
        str(source.parent), tag=source.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint files in {source}")
    if universal is not None:
        # DeepSpeed 0.19.8's ZeRO-3 universal loader (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
        # copies param group 0's hyperparameters into every group: time_decay/time_first would lose their
        # x2/x3 LR and the matrices their weight decay. Put each group's own back (ZeRO-1/2 load them per group).
        for group, own in zip(engine.optimizer.param_groups, hyper, strict=True):
            group.update(own)
        # The same loader stores ONE `step` tensor object in the state of every ZeRO-3 sub-group; torch's
        # Adam increments it in place once per sub-group, so after the first update the bias corrections
        # run ahead (resumed loss off by ~1e-3 after two steps). Give each state its own counter.
        base_optimizer = getattr(engine.optimizer, "optimizer", None)
        for param_state in getattr(base_optimizer, "state", {}).values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
    rng_file = ckpt_dir / f"rng_rank_{_rank():05d}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return state


def consolidated_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights (our parameter names) of a checkpoint, offline, whatever its ZeRO stage and world.

    ZeRO-1/2/3: the fp32 master partitions merged by `deepspeed.utils.zero_to_fp32` (under bf16 these
    are the optimizer's fp32 weights, not the bf16 module copy). ZeRO-0: the module weights DeepSpeed
    saved whole in `mp_rank_00_model_states.pt`: fp32 under fp32 training, the bf16 weights under bf16
    (equal to final_weights.pt; the fp32 masters of pipeline.optim.MasterWeightAdam are not mapped to names).
    """
    ckpt_dir = Path(ckpt_dir)
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no {COMPLETE} or {TRAIN_STATE})")
    if has_zero_shards(ckpt_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    else:
        # Plain containers, tensors and strings in 0.19.8, so the safe unpickler reads it.
        saved = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        state = saved["module"]
    expected = read_state(ckpt_dir)["parameter_shapes"]
    check_shapes({name: list(tensor.shape) for name, tensor in state.items()}, expected, ckpt_dir)
    return {name: tensor.detach().float().contiguous() for name, tensor in state.items()}


def export_rwkv4_pth(ckpt_dir: Path, path: str | os.PathLike) -> None:
    """The official RWKV-4 `.pth` (model/checkpoint.py) of a training checkpoint, written from any world size."""
    from model.checkpoint import save_rwkv4_pth

    save_rwkv4_pth(consolidated_state_dict(ckpt_dir), path)
