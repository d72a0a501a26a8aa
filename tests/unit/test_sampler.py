"""The magic-prime window sampler: a permutation per epoch, disjoint ranks, exact resume."""

from __future__ import annotations

import pytest

from tokenization.sampler import WindowSampler, is_prime, magic_prime


def test_magic_primes_match_the_reference() -> None:
    # reference/rwkv4.md 6.3: the Pile (332,115,325,534 tokens) at ctx 1024 .. 8192
    pile_tokens = 332_115_325_534
    for ctx_len, prime in [(1024, 324331313), (2048, 162165671), (4096, 81082817), (8192, 40541399)]:
        assert magic_prime((pile_tokens - 1) // ctx_len - 1) == prime
    assert magic_prime(10_008) == 10007 and magic_prime(2) == 2 and magic_prime(4) == 2
    assert [n for n in range(60) if is_prime(n) and n % 3 == 2] == [2, 5, 11, 17, 23, 29, 41, 47, 53, 59]
    with pytest.raises(ValueError, match="at least 2"):
        WindowSampler(num_tokens=10, ctx_len=8, seed=0)


# (35, 7), (176, 16): the token count a multiple of ctx_len whose quotient is itself such a prime
CASES = [(10_000, 7), (4 * 1024 + 1, 1024), (123_457, 100), (35, 7), (176, 16)]


@pytest.mark.parametrize(("num_tokens", "ctx_len"), CASES)
def test_every_chunk_is_read_once_per_epoch(num_tokens: int, ctx_len: int) -> None:
    sampler = WindowSampler(num_tokens, ctx_len, seed=3)
    p = sampler.samples_per_epoch
    assert p <= (num_tokens - 1) // ctx_len and p % 3 == 2 and is_prime(p)
    for epoch in range(3):
        starts = [sampler.start(epoch * p + i) for i in range(p)]
        assert sorted(starts) == [chunk * ctx_len for chunk in range(p)]
        assert max(starts) + ctx_len + 1 <= num_tokens  # every window of ctx_len + 1 tokens fits


def test_seed_and_epoch_change_the_order() -> None:
    a, b = WindowSampler(100_000, 10, seed=0), WindowSampler(100_000, 10, seed=1)
    p = a.samples_per_epoch
    epoch0 = [a.start(i) for i in range(50)]
    assert epoch0 != [a.start(p + i) for i in range(50)]
    assert epoch0 != [b.start(i) for i in range(50)]
    assert epoch0 == [WindowSampler(100_000, 10, seed=0).start(i) for i in range(50)]


def test_ranks_are_disjoint_and_cover_consecutive_indices() -> None:
    world_size, micro_bsz = 4, 3
    seen: list[int] = []
    for step in range(5):
        per_rank = [WindowSampler.rank_indices(step, micro_bsz, rank, world_size) for rank in range(world_size)]
        flat = [index for indices in per_rank for index in indices]
        assert len(set(flat)) == len(flat) == micro_bsz * world_size
        assert sorted(flat) == list(range(step * micro_bsz * world_size, (step + 1) * micro_bsz * world_size))
        seen += flat
    assert sorted(seen) == list(range(5 * micro_bsz * world_size))
    with pytest.raises(ValueError):
        WindowSampler.rank_indices(0, 2, rank=4, world_size=4)


def test_a_full_epoch_over_ranks_reads_every_window_once() -> None:
    sampler = WindowSampler(num_tokens=50_000, ctx_len=16, seed=7)
    world_size, micro_bsz = 2, 4
    steps = sampler.samples_per_epoch // (world_size * micro_bsz)
    starts = [
        sampler.start(index)
        for step in range(steps)
        for rank in range(world_size)
        for index in WindowSampler.rank_indices(step, micro_bsz, rank, world_size)
    ]
    assert len(set(starts)) == len(starts) == steps * world_size * micro_bsz


def run(sampler_seed: int, first_step: int, last_step: int, world_size: int = 2) -> list[list[int]]:
    sampler = WindowSampler(num_tokens=20_000, ctx_len=32, seed=sampler_seed)  # fresh: as after a restart
    return [
        [sampler.start(i) for i in WindowSampler.rank_indices(step, 4, rank, world_size)]
        for step in range(first_step, last_step)
        for rank in range(world_size)
    ]


def test_resume_at_any_step_reads_what_an_uninterrupted_run_reads() -> None:
    uninterrupted = run(5, 0, 200)  # crosses an epoch boundary (p = 617 samples, 8 per step)
    for restart in (1, 77, 150):
        assert run(5, 0, restart) + run(5, restart, 200) == uninterrupted


def test_a_step_reads_the_same_global_samples_on_another_world_size() -> None:
    # As pipeline/train.py does: micro-steps within the step, offset by the step's first global sample.
    def step_samples(first: int, grad_accum: int, world_size: int, micro_bsz: int = 4) -> list[int]:
        return sorted(
            first + offset
            for micro in range(grad_accum)
            for rank in range(world_size)
            for offset in WindowSampler.rank_indices(micro, micro_bsz, rank, world_size)
        )

    first = 7 * 16  # step 7 of a 16-sample global batch
    assert step_samples(first, grad_accum=1, world_size=4) == list(range(first, first + 16))
    assert step_samples(first, grad_accum=4, world_size=1) == step_samples(first, grad_accum=2, world_size=2)
