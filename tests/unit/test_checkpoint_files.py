"""A checkpoint folder copied file by file is used only when whole: complete, every rank's file list
present, every listed file at its listed size (pipeline/checkpoint_files.py)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.checkpoint_files import (
    COMPLETE,
    TRAIN_STATE,
    file_list_name,
    is_intact,
    newest_intact,
    write_file_list,
)


def _checkpoint(root: Path, step: int, world: int = 2) -> Path:
    """A folder as two ranks write it into per-rank staging folders that are then merged."""
    path = root / f"step_{step:08d}"
    for rank in range(world):
        staging = root / f"staging_{step}_{rank}"
        staging.mkdir(parents=True)
        (staging / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * (100 + rank))
        (staging / f"rng_rank_{rank:05d}.json").write_text("{}")
        if rank == 0:
            (staging / "mp_rank_00_model_states.pt").write_bytes(b"w" * 50)
        write_file_list(staging, rank)
        path.mkdir(exist_ok=True)
        for file in staging.iterdir():
            file.rename(path / file.name)
        staging.rmdir()
    (path / TRAIN_STATE).write_text(json.dumps({"step": step, "world_size": world}))
    (path / COMPLETE).write_text("ok\n")
    return path


def test_a_whole_folder_is_intact_and_each_list_names_only_its_ranks_files(tmp_path):
    path = _checkpoint(tmp_path, 10)
    assert is_intact(path)
    rank1 = json.loads((path / file_list_name(1)).read_text())
    assert rank1 == {"rng_rank_00001.json": 2, "zero_pp_rank_1_mp_rank_00_optim_states.pt": 101}


def test_a_cut_off_copy_is_not_intact(tmp_path):
    truncated = _checkpoint(tmp_path, 10)
    (truncated / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 7)
    missing_file = _checkpoint(tmp_path, 20)
    (missing_file / "mp_rank_00_model_states.pt").unlink()
    missing_list = _checkpoint(tmp_path, 30)
    (missing_list / file_list_name(1)).unlink()
    cut_list = _checkpoint(tmp_path, 40)
    (cut_list / file_list_name(0)).write_text('{"rng_rank_00000.json": 2, "mp_')
    unmarked = _checkpoint(tmp_path, 50)
    (unmarked / COMPLETE).unlink()
    for path in (truncated, missing_file, missing_list, cut_list, unmarked):
        assert not is_intact(path), path.name


def test_newest_intact_passes_over_a_newer_cut_off_folder(tmp_path):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20)
    newest = _checkpoint(tmp_path, 30)
    (newest / "rng_rank_00000.json").unlink()
    assert newest_intact(tmp_path).name == "step_00000020"
    assert newest_intact(tmp_path / "missing") is None


def test_a_folder_from_before_the_file_lists_is_never_taken_for_whole(tmp_path):
    path = tmp_path / "step_00000010"
    path.mkdir()
    (path / TRAIN_STATE).write_text(json.dumps({"step": 10, "world_size": 1}))
    (path / COMPLETE).write_text("ok\n")
    assert not is_intact(path)
