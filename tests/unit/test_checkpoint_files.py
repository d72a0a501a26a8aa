"""A checkpoint folder copied file by file is used only when whole: complete, every rank's file list
present, every listed file at its listed size (pipeline/checkpoint_files.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.checkpoint_files import (
    COMPLETE,
    TRAIN_STATE,
    file_list_name,
    is_intact,
    newest_intact,
    write_file_list,
    write_json_atomic,
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


def test_a_restarted_worker_group_takes_the_newest_whole_checkpoint_ray_did_not_record(tmp_path):
    """A lost worker: Ray restarts the group from the checkpoint it recorded (step 10), while the failed
    group had stored step 20 whole. Every start of the group looks again, so step 20 is not trained twice."""
    from orchestration.ray_train import newer_stored_checkpoint

    storage = tmp_path / "ray" / "pretrain"
    ten, twenty = _checkpoint(storage, 10), _checkpoint(storage, 20)
    assert newer_stored_checkpoint(ten, storage, driver_saw=str(ten)) == twenty  # a retry: the driver saw 10
    assert newer_stored_checkpoint(twenty, storage, driver_saw=str(ten)) is None  # Ray has the newest
    assert newer_stored_checkpoint(None, storage, driver_saw=None) == twenty  # a rerun Ray knows nothing of
    (twenty / file_list_name(1)).unlink()  # step 20 cut off mid-upload: not whole
    assert newer_stored_checkpoint(ten, storage, driver_saw=str(ten)) is None
    # A node that does not share the workdir sees less than the driver did: every rank must resume alike.
    with pytest.raises(FileNotFoundError, match="must be on a filesystem every node shares"):
        newer_stored_checkpoint(None, tmp_path / "private-copy", driver_saw=str(ten))


def test_pruning_after_a_run_keeps_what_ray_recorded_and_drops_what_it_never_did(tmp_path):
    """A rerun resumed from step 20, stored but never recorded: Ray's record now lists 10 and 30. Ray
    refuses to start on that storage again without 10, so 20 goes instead of the oldest."""
    from orchestration.ray_train import RAY_CHECKPOINT_RECORD, prune_unrecorded

    storage = tmp_path / "ray" / "pretrain"
    for step in (10, 20, 30):
        _checkpoint(storage, step)
    record = {"checkpoint_results": [{"checkpoint_dir_name": f"step_{n:08d}"} for n in (10, 30)]}
    (storage / RAY_CHECKPOINT_RECORD).write_text(json.dumps(record))
    assert [path.name for path in prune_unrecorded(storage, keep=2)] == ["step_00000020"]
    assert sorted(path.name for path in storage.glob("step_*")) == ["step_00000010", "step_00000030"]
    # Killed between step 40's upload and its record, the rerun trained no step: Ray still names 10 and 30.
    _checkpoint(storage, 40)
    assert prune_unrecorded(storage, keep=2) == []
    shutil.rmtree(storage / "step_00000040")
    (storage / RAY_CHECKPOINT_RECORD).unlink()  # no record (Ray never recorded one): the newest two stay
    _checkpoint(storage, 40)
    assert [path.name for path in prune_unrecorded(storage, keep=2)] == ["step_00000010"]
    assert sorted(path.name for path in storage.glob("step_*")) == ["step_00000030", "step_00000040"]


def test_a_json_write_cut_off_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / TRAIN_STATE
    write_json_atomic(path, {"step": 10})

    def dies_midway(payload, handle, **kwargs):
        handle.write('{"step": ')
        raise KeyboardInterrupt  # the process stopped while writing

    monkeypatch.setattr(json, "dump", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"step": 20})
    assert json.loads(path.read_text()) == {"step": 10}
