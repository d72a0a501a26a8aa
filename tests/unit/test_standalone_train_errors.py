"""The standalone trainer's likely mistakes: one `error:` line naming the argument, exit 2, no traceback,
and nothing started (no process group, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.train import main
from tokenization.synthetic import write_synthetic_shards

QUICKSTART = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"), tokens=4096, vocab_size=64, val_tokens=2048)


def test_data_that_is_no_shard_directory(capsys, tmp_path: Path) -> None:
    assert main([QUICKSTART, "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'manifest.json'} not found. Give a tokenize stage's folder")
    assert "delete the folder" not in err  # the advice for a damaged shard does not fit a folder that is none


@pytest.mark.parametrize(
    ("option", "cause"),
    [
        ("--resume", "not a complete training checkpoint (a step_* folder with COMPLETE)"),
        ("--init-weights", "no such file (give an earlier run's final_weights.pt)"),
    ],
)
def test_a_missing_start_point(capsys, tmp_path: Path, shards: Path, option: str, cause: str) -> None:
    missing = tmp_path / "step_00000010"
    assert main([QUICKSTART, "--data", str(shards), "--out", str(tmp_path / "out"), option, str(missing)]) == 2
    assert capsys.readouterr().err == f"error: {option} {missing}: {cause}\n"
