"""Which checkpoint folders are whole, decided from their files alone (no torch: the Ray driver reads it).

A checkpoint folder is *complete* when rank 0 has written `train_state.json` and then `COMPLETE`.
Before that, every rank lists the files it sees in the folder with their sizes
(`files_rank_00000.json`, ...). A folder copied elsewhere file by file, as Ray Train uploads each
rank's files into its storage folder, can be cut off part way (Ctrl-C, a lost node): it is *intact*
only when it is complete and every rank's list is there, with each file it names at that size.

    newest_intact(root)   # the newest intact `step_*` folder under root, or None
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"
TRAIN_STATE = "train_state.json"
FILE_LIST_PREFIX = "files_rank_"


def file_list_name(rank: int) -> str:
    return f"{FILE_LIST_PREFIX}{rank:05d}.json"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def list_checkpoints(root: Path) -> list[Path]:
    """All `step_*` directories under root, oldest first (complete or not)."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=step_of)


def is_complete(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / COMPLETE).is_file() and (Path(ckpt_dir) / TRAIN_STATE).is_file()


def write_file_list(ckpt_dir: Path, rank: int) -> None:
    """This rank's list of the folder's files and sizes; call once every rank's files are written."""
    ckpt_dir = Path(ckpt_dir)
    files = {
        p.name: p.stat().st_size
        for p in sorted(ckpt_dir.iterdir())
        if p.is_file()
        and not p.name.startswith(FILE_LIST_PREFIX)
        and p.name not in (COMPLETE, TRAIN_STATE)
        and not p.name.endswith(".tmp")
    }
    write_json_atomic(ckpt_dir / file_list_name(rank), files)


def is_intact(ckpt_dir: Path) -> bool:
    """Complete, and every file each rank listed is present at its listed size."""
    ckpt_dir = Path(ckpt_dir)
    if not is_complete(ckpt_dir):
        return False
    try:
        world = int(json.loads((ckpt_dir / TRAIN_STATE).read_text())["world_size"])
        lists = [json.loads((ckpt_dir / file_list_name(rank)).read_text()) for rank in range(world)]
    except (OSError, ValueError, KeyError, TypeError):  # missing, cut off mid-copy, or from before the lists
        return False
    for files in lists:
        for name, size in files.items():
            path = ckpt_dir / name
            if not path.is_file() or path.stat().st_size != size:
                return False
    return True


def newest_intact(root: Path) -> Path | None:
    for path in reversed(list_checkpoints(root)):
        if is_intact(path):
            return path
    return None


def prune(root: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints under root; drop older and unfinished ones."""
    checkpoints = list_checkpoints(root)
    complete = [p for p in checkpoints if is_complete(p)]
    keep_set = set(complete[-keep:]) if keep > 0 else set()
    newest = step_of(complete[-1]) if complete else -1
    removed = []
    for path in checkpoints:
        if path not in keep_set and step_of(path) <= newest:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
