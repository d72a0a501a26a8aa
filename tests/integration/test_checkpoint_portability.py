"""Checkpoints across world sizes: written by N workers, resumed by M (2 -> 1 and 1 -> 2), and exported.

Real DeepSpeed ZeRO-2, fp32, gloo on CPU: 2 workers under `torchrun`, 1 worker as a plain process, all
through the standalone entry point (orchestration/train.py) on real text. Each uninterrupted run
checkpoints at step K; a second run resumes that checkpoint (`--resume`) with the other worker count
and trains to the end. Deterministic training makes the uninterrupted run's step-K checkpoint the
same files a run stopped at K would have written (tests/integration/test_resume.py shows that).

What must hold after the world-size change:
* The global batch is kept (grad_accum rescaled, announced on stdout), so each step reads the same
  global sample indices as the uninterrupted run: every index in 0 .. STEPS x BATCH - 1 exactly once.
* The first resumed step's loss equals the uninterrupted run's to 1e-6 relative (the weights came back
  exactly), and every later step's to LOSS_RTOL. Why not 1e-6 throughout: the other worker count sums
  gradients in another order (all-reduce of 2 ranks vs 2 accumulated micro-steps), and Adam's first
  steps amplify that (an element with a near-zero gradient moves by +-lr either way). Measured here:
  <= 3e-6 after resume; two uninterrupted runs, 2 workers x grad_accum 1 vs 1 worker x grad_accum 2,
  differ by up to 3.5e-5 from step 1 on. A resume that lost the Adam moments differs by ~1e-2 at the
  next step, so LOSS_RTOL = 5e-5 still catches it.
* The exported official .pth of the 2-worker ZeRO-2 checkpoint (merged offline by DeepSpeed's
  zero_to_fp32) loads with model/checkpoint.py and gives the live model's logits.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from train_fixtures import run_ok, stdlib_shards, step_records, tiny_config, train_command

from pipeline.checkpoint import read_state

STEPS, K, MICRO_BSZ, BATCH = 12, 6, 4, 8  # BATCH = micro_bsz x grad_accum x world, kept across the change
LOSS_RTOL = 5e-5


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stdlib_shards(tmp_path_factory)


def _config(path: Path, zero_stage: int = 2) -> Path:
    return tiny_config(
        path, steps=STEPS, checkpoint_every=K, log_every=K, val_every=STEPS, sample_log=True, zero_stage=zero_stage
    )


def _two_worker_run(shards: Path, root: Path, zero_stage: int) -> Path:
    """An uninterrupted 2-worker run (grad_accum 1), checkpoints at K and STEPS."""
    root.mkdir(parents=True, exist_ok=True)
    run_ok(train_command(_config(root / "run.yaml", zero_stage), shards, root / "out", 2))
    return root / "out"


@pytest.fixture(scope="module")
def two_worker_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _two_worker_run(shards, tmp_path_factory.mktemp("two-workers"), zero_stage=2)


def _check_resume(clean: Path, resumed: Path, stdout: str, saved_world: int, world: int) -> None:
    assert f"was written by {saved_world} workers: grad_accum" in stdout, stdout[-2000:]
    assert re.search(rf"resumed from \S+/step_{K:08d} at step {K} \(global sample {K * BATCH};", stdout)
    clean_steps, resumed_steps = step_records(clean), step_records(resumed)
    assert sorted(resumed_steps) == list(range(K, STEPS))

    # Sample accounting: each step reads what the uninterrupted run read there, and the clean run's
    # steps before K plus the resumed steps cover every global index exactly once.
    for step in range(K, STEPS):
        assert (
            resumed_steps[step]["samples"]
            == clean_steps[step]["samples"]
            == list(range(step * BATCH, (step + 1) * BATCH))
        )
    read = [i for step in range(K) for i in clean_steps[step]["samples"]]
    read += [i for step in range(K, STEPS) for i in resumed_steps[step]["samples"]]
    assert sorted(read) == list(range(STEPS * BATCH))

    # Loss curve: the first resumed step exactly (same weights, same samples), later ones to LOSS_RTOL.
    errors = {
        step: abs(resumed_steps[step]["loss"] - clean_steps[step]["loss"]) / abs(clean_steps[step]["loss"])
        for step in range(K, STEPS)
    }
    print(f"resume {saved_world} -> {world} workers: max relative loss difference {max(errors.values()):.2e}")
    assert errors[K] <= 1e-6, errors
    assert max(errors.values()) <= LOSS_RTOL, errors

    # The resumed run's own checkpoints are partitioned for its world size and keep the global batch.
    final = resumed / "checkpoints" / f"step_{STEPS:08d}"
    state = read_state(final)
    assert (state["world_size"], state["samples_per_step"], state["step"]) == (world, BATCH, STEPS)
    assert state["sampler"]["next_sample"] == STEPS * BATCH
    assert len(list(final.glob("*zero_pp_rank_*_optim_states.pt"))) == world
    assert not (resumed / "universal").exists()  # the scratch conversion is removed after loading


def test_two_worker_checkpoint_resumes_on_one_worker(two_worker_run: Path, shards: Path, tmp_path: Path) -> None:
    checkpoint = two_worker_run / "checkpoints" / f"step_{K:08d}"
    assert len(list(checkpoint.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    resumed = tmp_path / "resumed-on-1"
    stdout = run_ok(train_command(_config(tmp_path / "run.yaml"), shards, resumed, 1, "--resume", str(checkpoint)))
    _check_resume(two_worker_run, resumed, stdout, saved_world=2, world=1)


def test_one_worker_checkpoint_resumes_on_two_workers(shards: Path, tmp_path: Path) -> None:
    config = _config(tmp_path / "run.yaml")
    clean = tmp_path / "one-worker"
    run_ok(train_command(config, shards, clean, 1, "train.grad_accum=2"))  # batch 8 on one worker
    checkpoint = clean / "checkpoints" / f"step_{K:08d}"
    resumed = tmp_path / "resumed-on-2"
    # The same config (grad_accum 2) on two workers: the resume rescales it to 1 to keep batch 8.
    stdout = run_ok(train_command(config, shards, resumed, 2, "train.grad_accum=2", "--resume", str(checkpoint)))
    _check_resume(clean, resumed, stdout, saved_world=1, world=2)


def test_export_of_two_worker_zero2_checkpoint_gives_live_logits(
    two_worker_run: Path, shards: Path, tmp_path: Path
) -> None:
    """`rwkv-pipeline export RUN --checkpoint step_N` and `pipeline.checkpoint.export_rwkv4_pth`."""
    import json

    from model import ModelConfig, build_model
    from model.checkpoint import load_rwkv4_pth
    from orchestration.cli import main as cli
    from pipeline.checkpoint import consolidated_state_dict, export_rwkv4_pth

    checkpoint = two_worker_run / "checkpoints" / f"step_{STEPS:08d}"
    assert len(list(checkpoint.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    # A run directory whose tokenizer stage is done (the export copies the tokenizer beside the weights).
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(
        json.dumps({"stages": {"tokenizer": {"status": "done", "dir": str(shards.parent / "tokenizer")}}})
    )
    assert cli(["export", str(run_dir), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "tokenizer.model").is_file()
    export_rwkv4_pth(checkpoint, tmp_path / "model.pth")

    # The live model: the weights the training engine held at its last step (written by rank 0 at the end).
    live = build_model(ModelConfig(**read_state(checkpoint)["model_config"]))
    live.load_state_dict(torch.load(two_worker_run / "final_weights.pt", weights_only=True))
    live.eval()
    merged = consolidated_state_dict(checkpoint)
    assert merged.keys() == live.state_dict().keys()
    for name, tensor in live.state_dict().items():
        assert torch.equal(merged[name], tensor), name  # fp32 master partitions == the live fp32 weights

    tokens_BT = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_BTV = live(tokens_BT)
        for path in (tmp_path / "cli" / "model.pth", tmp_path / "model.pth"):
            exported = load_rwkv4_pth(path, wkv_backend="torch").eval()
            assert torch.equal(exported(tokens_BT), expected_BTV), path


def test_zero3_two_worker_checkpoint_resumes_on_one_worker_and_exports(shards: Path, tmp_path: Path) -> None:
    """ZeRO-3 partitions the weights too. DeepSpeed 0.19.8's ZeRO-3 universal loader shares one Adam step
    counter between sub-groups and copies group 0's hyperparameters into all (both undone in
    pipeline/checkpoint.py): without that the resumed loss is off by ~1e-3 two steps after the resume."""
    clean = _two_worker_run(shards, tmp_path / "clean", zero_stage=3)
    checkpoint = clean / "checkpoints" / f"step_{K:08d}"
    assert len(list(checkpoint.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 2  # weights partitioned
    resumed = tmp_path / "resumed-on-1"
    config = _config(tmp_path / "run.yaml", zero_stage=3)
    stdout = run_ok(train_command(config, shards, resumed, 1, "--resume", str(checkpoint)))
    _check_resume(clean, resumed, stdout, saved_world=2, world=1)

    from pipeline.checkpoint import consolidated_state_dict

    live = torch.load(clean / "final_weights.pt", weights_only=True)  # gathered by the live engine at the end
    merged = consolidated_state_dict(clean / "checkpoints" / f"step_{STEPS:08d}")
    assert merged.keys() == live.keys()
    for name, tensor in live.items():
        assert torch.equal(merged[name], tensor), name


def test_global_batch_kept_or_refused_with_the_numbers() -> None:
    """grad_accum absorbs a change of worker count; a batch the new count cannot keep is refused."""
    from pipeline.checkpoint import CheckpointMismatch
    from pipeline.config import TrainConfig
    from pipeline.train import keep_global_batch

    saved = {"samples_per_step": 8, "world_size": 2}
    assert keep_global_batch(TrainConfig(micro_bsz=4, grad_accum=1), saved, world=1).grad_accum == 2
    assert keep_global_batch(TrainConfig(micro_bsz=2, grad_accum=1), saved, world=1).grad_accum == 4
    assert keep_global_batch(TrainConfig(micro_bsz=4, grad_accum=2), {**saved, "world_size": 1}, 2).grad_accum == 1
    assert keep_global_batch(TrainConfig(micro_bsz=4, grad_accum=1), saved, world=2).grad_accum == 1
    with pytest.raises(CheckpointMismatch, match=r"micro_bsz x world = 12 must divide it"):
        keep_global_batch(TrainConfig(micro_bsz=4, grad_accum=1), saved, world=3)
    with pytest.raises(CheckpointMismatch, match=r"written with 8 samples per step"):  # same world, other batch
        keep_global_batch(TrainConfig(micro_bsz=2, grad_accum=1), saved, world=2)
