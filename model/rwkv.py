"""RWKV-4 in GPT (parallel) mode: token shift, TimeMix, ChannelMix, ln0 on block 0, untied head.

Legend: B batch, T time, C n_embd, A dim_att, F dim_ffn, V vocab.

Parameter names equal the official RWKV-4 checkpoint keys (reference/rwkv4.md §7.2), so
`state_dict()` maps 1:1 onto an export; the only difference is that time_mix_* are stored as (C,)
here (torch.compile fails in backward on (1, 1, C) parameters) and written as (1, 1, C) on export.

    >>> import torch
    >>> from model import ModelConfig, RWKV
    >>> net = RWKV(ModelConfig(n_layer=2, n_embd=32, vocab_size=50, wkv_backend="reference"))
    >>> net(torch.zeros(1, 5, dtype=torch.long)).shape
    torch.Size([1, 5, 50])

A long sequence can be run chunk by chunk, gradients flowing through the carried state:

    >>> logits, state = net.forward_with_state(torch.zeros(1, 3, dtype=torch.long))
    >>> logits, state = net.forward_with_state(torch.zeros(1, 2, dtype=torch.long), state)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.fused_loss import LMHead
from model.ln_shift_mix import ln_shift_mix
from model.wkv import wkv
from model.wkv_reference import State as WkvState

# Per layer: (att x_prev (B, C), (aa, bb, pp) each (B, A), ffn x_prev (B, C)).
LayerState = tuple[torch.Tensor, WkvState, torch.Tensor]
ModelState = list[LayerState]
STATE_TENSORS_PER_LAYER = 5  # a LayerState flattened (flatten_state): att x_prev, aa, bb, pp, ffn x_prev

LN_MIX_KERNEL_DEVICES = frozenset({"cuda"})
"""The device types on which ModelConfig.fused_ln_mix takes model/ln_shift_mix.py's Triton kernel. CPU
tensors keep the plain blocks: there the kernels run only interpreted (TRITON_INTERPRET=1), which the
tests do by adding "cpu"."""


def token_shift(x_BTC: torch.Tensor, x_prev_BC: torch.Tensor | None) -> torch.Tensor:
    """xx[:, t] = x[:, t-1]; xx[:, 0] = x_prev (zeros at the start of a sequence)."""
    if x_prev_BC is None:
        return F.pad(x_BTC, (0, 0, 1, -1))
    return torch.cat([x_prev_BC.unsqueeze(1).to(x_BTC.dtype), x_BTC[:, :-1]], dim=1)


def mix(x: torch.Tensor, xx: torch.Tensor, time_mix: torch.Tensor) -> torch.Tensor:
    return x * time_mix + xx * (1 - time_mix)


class TimeMix(nn.Module):
    """The `att` branch: receptance-gated WKV over token-shifted key/value."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n_embd, dim_att = config.n_embd, config.dim_att
        self.wkv_backend = config.wkv_backend
        self.time_decay = nn.Parameter(torch.zeros(dim_att))
        self.time_first = nn.Parameter(torch.zeros(dim_att))
        self.time_mix_k = nn.Parameter(torch.ones(n_embd))
        self.time_mix_v = nn.Parameter(torch.ones(n_embd))
        self.time_mix_r = nn.Parameter(torch.ones(n_embd))
        self.key = nn.Linear(n_embd, dim_att, bias=False)
        self.value = nn.Linear(n_embd, dim_att, bias=False)
        self.receptance = nn.Linear(n_embd, dim_att, bias=False)
        self.output = nn.Linear(dim_att, n_embd, bias=False)

    def forward(
        self, x_BTC: torch.Tensor, x_prev_BC: torch.Tensor | None = None, wkv_state: WkvState | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, WkvState]:
        """Returns (out (B, T, C), last input x[:, -1] (B, C), WKV state after the last step)."""
        xx = token_shift(x_BTC, x_prev_BC)
        mixed = [mix(x_BTC, xx, m) for m in (self.time_mix_k, self.time_mix_v, self.time_mix_r)]
        out_BTC, wkv_state = self.from_mixed(*mixed, wkv_state)
        return out_BTC, x_BTC[:, -1], wkv_state

    def mixes(self) -> torch.Tensor:
        """(3, C): the k, v, r mixes, in the order from_mixed takes their results."""
        return torch.stack([self.time_mix_k, self.time_mix_v, self.time_mix_r])

    def from_mixed(
        self, xk_BTC: torch.Tensor, xv_BTC: torch.Tensor, xr_BTC: torch.Tensor, wkv_state: WkvState | None
    ) -> tuple[torch.Tensor, WkvState]:
        k_BTA = self.key(xk_BTC)
        v_BTA = self.value(xv_BTC)
        sr_BTA = torch.sigmoid(self.receptance(xr_BTC))
        # The WKV op picks its own precision from k's dtype (fp32 state, max-trick); under torch.autocast
        # (bf16 training on fp32 weights) its backends' internal matmuls must not be recast.
        with torch.autocast(k_BTA.device.type, enabled=False):
            y_BTA, wkv_state = wkv(self.time_decay, self.time_first, k_BTA, v_BTA, wkv_state, backend=self.wkv_backend)
        return self.output(sr_BTA * y_BTA.to(sr_BTA.dtype)), wkv_state


class ChannelMix(nn.Module):
    """The `ffn` branch: receptance-gated squared-ReLU MLP over token-shifted input."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n_embd, dim_ffn = config.n_embd, config.dim_ffn
        self.time_mix_k = nn.Parameter(torch.ones(n_embd))
        self.time_mix_r = nn.Parameter(torch.ones(n_embd))
        self.key = nn.Linear(n_embd, dim_ffn, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(dim_ffn, n_embd, bias=False)

    def forward(self, x_BTC: torch.Tensor, x_prev_BC: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (out (B, T, C), last input x[:, -1] (B, C))."""
        xx = token_shift(x_BTC, x_prev_BC)
        return self.from_mixed(mix(x_BTC, xx, self.time_mix_k), mix(x_BTC, xx, self.time_mix_r)), x_BTC[:, -1]

    def mixes(self) -> torch.Tensor:
        """(2, C): the k, r mixes, in the order from_mixed takes their results."""
        return torch.stack([self.time_mix_k, self.time_mix_r])

    def from_mixed(self, xk_BTC: torch.Tensor, xr_BTC: torch.Tensor) -> torch.Tensor:
        k_BTF = torch.square(torch.relu(self.key(xk_BTC)))
        return torch.sigmoid(self.receptance(xr_BTC)) * self.value(k_BTF)


class Block(nn.Module):
    """Pre-LN residual block; block 0 also owns ln0, the LayerNorm right after the embedding.

    ln0 lives in block 0 for the checkpoint key (`blocks.0.ln0.*`), but RWKV applies it, so that
    every block runs the same code: torch.compile then traces one frame for all of them instead of
    specialising block 0 (and recompiling per layer index).
    """

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(config.n_embd)
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.att = TimeMix(config)
        self.ffn = ChannelMix(config)
        self.fused_ln_mix = config.fused_ln_mix

    def forward(self, x_BTC: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        att_x_prev, wkv_state, ffn_x_prev = state if state is not None else (None, None, None)
        if self.fused_ln_mix and x_BTC.device.type in LN_MIX_KERNEL_DEVICES:
            return self._forward_fused(x_BTC, att_x_prev, wkv_state, ffn_x_prev)
        att_out, att_last, wkv_state = self.att(self.ln1(x_BTC), att_x_prev, wkv_state)
        x_BTC = x_BTC + att_out
        ffn_out, ffn_last = self.ffn(self.ln2(x_BTC), ffn_x_prev)
        return x_BTC + ffn_out, (att_last, wkv_state, ffn_last)

    def _forward_fused(self, x_BTC, att_x_prev, wkv_state, ffn_x_prev) -> tuple[torch.Tensor, LayerState]:
        """forward with each branch's LayerNorm, token shift and mixes in one kernel (config.fused_ln_mix)."""
        ln1, ln2 = self.ln1, self.ln2
        mixed, att_last = ln_shift_mix(x_BTC, ln1.weight, ln1.bias, att_x_prev, self.att.mixes(), ln1.eps)
        att_out, wkv_state = self.att.from_mixed(*mixed, wkv_state)
        x_BTC = x_BTC + att_out
        mixed, ffn_last = ln_shift_mix(x_BTC, ln2.weight, ln2.bias, ffn_x_prev, self.ffn.mixes(), ln2.eps)
        return x_BTC + self.ffn.from_mixed(*mixed), (att_last, wkv_state, ffn_last)


class RWKV(nn.Module):
    """RWKV-4 language model; `model(idx_BT)` returns logits (B, T, V).

    Set `checkpoint_blocks = True` to recompute each block in backward (activation checkpointing
    via torch.utils.checkpoint, no DeepSpeed needed). Construct under `torch.device("meta")` to
    skip the initialisation (the checkpoint loader does this and assigns the loaded tensors).

    Set `chunk_len = N` to run `model(idx_BT)` N tokens at a time, the state carried from chunk to
    chunk without detaching it: the same logits and, in backward, the same gradients (full BPTT),
    with each WKV call at most N long. With `checkpoint_chunks` (the default) each chunk's
    embedding, blocks and ln_out run under one activation checkpoint whose inputs and outputs are
    the chunk's tokens and the carried state: the forward keeps only the tokens, the state at each
    chunk boundary and ln_out's output (what the head needs); backward recomputes one chunk at a
    time (about one extra forward), so activation memory is one chunk's, not one window's. The
    head and its logits (B, T, V) stay whole when the loss is computed outside the model. With
    `checkpoint_blocks` as well, the blocks are checkpointed inside each chunk's recompute: one
    more forward, for one block's activations at a time instead of one chunk's.
    `model(idx_BT, targets=y_BT)` returns the loss instead, the head fused with it: no logits kept.
    A chunked model is compiled with `compile_chunks()`, not as a whole (see there).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_blocks = False
        self.chunk_len = 0
        self.checkpoint_chunks = True
        self._compiled_chunk: Callable[..., tuple[torch.Tensor, ...]] | None = None  # set by compile_chunks()
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        # nn.Linear(C, V), no bias; + fused loss (its CUDA row kernel unless the config avoids CUDA builds)
        self.head = LMHead(config.n_embd, config.vocab_size, cuda_kernels=config.cuda_kernels)
        if not self.emb.weight.is_meta:
            from model.init import init_rwkv4_  # init imports this module for its type

            init_rwkv4_(self)

    def forward(
        self, idx_BT: torch.Tensor, state: ModelState | None = None, *, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, V); with `targets` (B, T) the training loss instead, fused with the head.

        The loss equals `language_model_loss(model(idx_BT), targets)` (cross-entropy with L2Wrap) but
        never holds the logits: `head.fused_loss_chunk` rows of them at a time (model/fused_loss.py).
        """
        if not 0 < self.chunk_len < idx_BT.shape[1]:
            return self.head(self.features(idx_BT, state)[0], targets)
        chunks_BtC = []
        for start in range(0, idx_BT.shape[1], self.chunk_len):
            x_BtC, state = self._chunk_features(idx_BT[:, start : start + self.chunk_len], state)
            chunks_BtC.append(x_BtC)
        return self.head(torch.cat(chunks_BtC, dim=1), targets)

    def forward_with_state(
        self, idx_BT: torch.Tensor, state: ModelState | None = None
    ) -> tuple[torch.Tensor, ModelState]:
        """Logits (B, T, V) and the state after the last token; pass it back in to continue the sequence."""
        x_BTC, new_state = self.features(idx_BT, state)
        return self.head(x_BTC), new_state

    def features(self, idx_BT: torch.Tensor, state: ModelState | None = None) -> tuple[torch.Tensor, ModelState]:
        """Everything before the head: ln_out's output (B, T, C) and the state after the last token."""
        x_BTC = self.blocks[0].ln0(self.emb(idx_BT))
        new_state: ModelState = []
        for i, block in enumerate(self.blocks):
            layer_state = state[i] if state is not None else None
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x_BTC, layer_state = checkpoint(block, x_BTC, layer_state, use_reentrant=False)
            else:
                x_BTC, layer_state = block(x_BTC, layer_state)
            new_state.append(layer_state)
        return self.ln_out(x_BTC), new_state

    def compile_chunks(self, **compile_kwargs: Any) -> None:
        """torch.compile what runs one chunk (embedding, blocks, ln_out, with the state in and out),
        leaving the chunk loop, the activation checkpoint around each chunk and the head eager.

        Compiling a chunked model as a whole puts every chunk's checkpoint into the graph; on an
        H200 (torch 2.11) Inductor then failed in the backward's lowering, and crashed or hung formatting
        its error (docs/benchmarks.md, Training, session 16). Here the checkpoint wraps the compiled
        function: the recompute in backward runs it compiled again, and its backward is compiled too.
        Graphs: one for the first chunk (no state yet), one for the others, one for a shorter last chunk.
        Static shapes, always: with a dynamic graph compiled for the shorter last chunk, the recompute
        of an earlier chunk took that graph instead of the one its forward ran, which saves other
        tensors for backward (torch.utils.checkpoint's CheckpointError).
        """
        self._compiled_chunk = torch.compile(self._flat_features, **{**compile_kwargs, "dynamic": False})

    def _chunk_features(self, idx_BT: torch.Tensor, state: ModelState | None) -> tuple[torch.Tensor, ModelState]:
        run_chunk = self._compiled_chunk or self._flat_features
        flat_in = flatten_state(state)
        if self.checkpoint_chunks and torch.is_grad_enabled():
            # The state goes in and out as flat tensors: checkpoint saves tensor arguments for the
            # recompute (and counts them as saved for backward) but would only hold a nested list.
            x_BTC, *flat_state = checkpoint(run_chunk, idx_BT, *flat_in, use_reentrant=False)
        else:
            x_BTC, *flat_state = run_chunk(idx_BT, *flat_in)
        return x_BTC, unflatten_state(flat_state)

    def _flat_features(self, idx_BT: torch.Tensor, *flat_state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x_BTC, state = self.features(idx_BT, unflatten_state(list(flat_state)))
        # Cloned: the token-shift states are views x[:, -1] of whole-chunk activations, which as
        # outputs (and the next chunk's saved inputs) would keep every chunk's activations alive.
        return x_BTC, *(tensor.clone() for tensor in flatten_state(state))


def flatten_state(state: ModelState | None) -> list[torch.Tensor]:
    """Per layer [att x_prev, aa, bb, pp, ffn x_prev]; [] for no state (the start of a sequence).

    This flat list is also RNN mode's state (model/rnn.py), so either mode can continue the other.
    """
    return [] if state is None else [t for att, wkv_state, ffn in state for t in (att, *wkv_state, ffn)]


def unflatten_state(flat: list[torch.Tensor]) -> ModelState | None:
    """The inverse of `flatten_state`."""
    if not flat:
        return None
    per_layer = STATE_TENSORS_PER_LAYER
    return [(flat[i], (flat[i + 1], flat[i + 2], flat[i + 3]), flat[i + 4]) for i in range(0, len(flat), per_layer)]


def detach_state(state: ModelState) -> ModelState:
    """The same state cut from the autograd graph (truncated backpropagation between chunks)."""
    return [(a.detach(), tuple(s.detach() for s in wkv_state), f.detach()) for a, wkv_state, f in state]  # type: ignore[misc]
