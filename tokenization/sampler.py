"""Which window each training sample reads: the magic-prime walk, O(1) memory, restartable anywhere.

    sampler = WindowSampler(num_tokens=1_000_000, ctx_len=128, seed=0)
    first = 160  # the optimizer step's first global sample (pipeline/train.py, first_sample_of)
    for offset in sampler.rank_indices(micro=1, micro_bsz=8, rank=1, world_size=2):
        window = dataset.window(sampler.start(first + offset), 128 + 1)

The stream holds `chunks = (num_tokens - 1) // ctx_len` whole ctx_len-aligned chunks that can start a
window of ctx_len + 1 tokens. p is the largest prime <= chunks with p = 2 (mod 3); then x -> x^3 is a
permutation of Z_p (gcd(3, p - 1) = 1), and so is x -> a * (x + b)^3 mod p for any a != 0 and b.
One epoch is p samples; sample i of epoch e reads chunk a_e * (i + b_e)^3 mod p, so every chunk
below p is read exactly once per epoch (reference/rwkv4.md section 6.3; the reference fixes a to
the golden-ratio multiple of p and b to 0, here both come from a hash of (seed, epoch) so each
epoch and seed walks a different order). Chunks p..chunks-1 (under 1 % of the data for large
streams, by the density of primes) are never read.

A sample is named by its global index g (epoch = g // p) and the sampler keeps no position: a run
resumes from the checkpoint's `sampler.next_sample`, the global index of the next step's first sample
(pipeline/train.py, `first_sample_of`), and reads exactly what an uninterrupted run reads there, on
any world size.
"""

from __future__ import annotations

import hashlib


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for n < 3.3e24."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for base in small:
        x = pow(base, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(chunks: int) -> int:
    """The largest prime p <= chunks with p % 3 == 2."""
    if chunks < 2:
        raise ValueError(f"the stream holds {chunks} whole windows; the magic-prime walk needs at least 2")
    candidate = chunks - (chunks - 2) % 3  # the largest value <= chunks that is 2 mod 3
    while not is_prime(candidate):
        candidate -= 3
    return candidate


class WindowSampler:
    """Global sample index -> token offset of a ctx_len + 1 window; see the module docstring."""

    def __init__(self, num_tokens: int, ctx_len: int, seed: int) -> None:
        if ctx_len < 1:
            raise ValueError(f"ctx_len must be positive, got {ctx_len}")
        self.num_tokens, self.ctx_len, self.seed = num_tokens, ctx_len, seed
        self.chunks = (num_tokens - 1) // ctx_len  # chunk k reads tokens [k*ctx_len, (k+1)*ctx_len + 1)
        self.prime = magic_prime(self.chunks)
        self.samples_per_epoch = self.prime
        self._epoch_params: dict[int, tuple[int, int]] = {}

    def _params(self, epoch: int) -> tuple[int, int]:
        """(multiplier in 1..p-1, shift in 0..p-1) of an epoch, from a hash of (seed, epoch)."""
        if epoch not in self._epoch_params:
            digest = hashlib.sha256(f"window-sampler:{self.seed}:{epoch}".encode()).digest()
            multiplier = 1 + int.from_bytes(digest[:8], "big") % (self.prime - 1)
            shift = int.from_bytes(digest[8:16], "big") % self.prime
            self._epoch_params = {epoch: (multiplier, shift)}  # O(1) memory: keep the current epoch only
        return self._epoch_params[epoch]

    def chunk(self, global_index: int) -> int:
        if global_index < 0:
            raise IndexError(f"global sample index must be >= 0, got {global_index}")
        epoch, index = divmod(global_index, self.prime)
        multiplier, shift = self._params(epoch)
        return multiplier * pow(index + shift, 3, self.prime) % self.prime

    def start(self, global_index: int) -> int:
        """Token offset of the sample's window (ctx_len + 1 tokens)."""
        return self.chunk(global_index) * self.ctx_len

    @staticmethod
    def rank_indices(micro: int, micro_bsz: int, rank: int, world_size: int) -> list[int]:
        """Sample indices rank `rank` reads at micro-step `micro` (0-based), relative to a first sample.

        Micro-step m covers [m * micro_bsz * world_size, (m + 1) * micro_bsz * world_size); rank r
        takes the r-th block of micro_bsz of them. Ranks are disjoint and the union over ranks is
        contiguous. The training loop passes the micro-step within the optimizer step
        (0..grad_accum - 1) and adds the step's first global sample (pipeline/train.py,
        `first_sample_of`), so a resume on another world size (grad_accum rescaled) reads the same
        global samples; a global micro-step count would not.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        first = (micro * world_size + rank) * micro_bsz
        return list(range(first, first + micro_bsz))
