"""RWKV-4 in RNN mode: one token per step with a constant-size state, and sampling-based generation.

Legend: B batch, C n_embd, A dim_att, V vocab.

The state is the `rwkv` package's layout (reference/rwkv4.md §7.3): a flat list of 5 tensors per
layer i, [5i+0] att's previous normalised input (B, C), [5i+1..3] aa, bb, pp (B, A) in float32,
[5i+4] ffn's previous normalised input (B, C). The step is written out from the weights, separately
from the GPT-mode modules, so the two modes check each other.

    >>> from model import ModelConfig, RWKV
    >>> from model.rnn import generate
    >>> net = RWKV(ModelConfig(n_layer=2, n_embd=32, vocab_size=50, wkv_backend="reference"))
    >>> new_tokens = generate(net, [1, 2, 3], max_new_tokens=5, temperature=0.8, top_p=0.9, seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from model.rwkv import RWKV, STATE_TENSORS_PER_LAYER, Block, flatten_state
from model.wkv_reference import EMPTY_EXPONENT

FlatState = list[torch.Tensor]  # model.rwkv.flatten_state's layout; unflatten_state turns it into GPT mode's


def zero_rnn_state(model: RWKV, batch: int = 1) -> FlatState:
    config, device = model.config, model.emb.weight.device
    state: FlatState = []
    for _ in range(config.n_layer):
        x_prev = torch.zeros(batch, config.n_embd, device=device, dtype=model.emb.weight.dtype)
        aa = torch.zeros(batch, config.dim_att, device=device, dtype=torch.float32)
        state += [x_prev, aa, aa.clone(), torch.full_like(aa, EMPTY_EXPONENT), x_prev.clone()]
    return state


def wkv_step(
    w_A: torch.Tensor, u_A: torch.Tensor, k_BA: torch.Tensor, v_BA: torch.Tensor, aa, bb, pp
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the max-trick recurrence (§1.2): (wkv_t, aa, bb, pp) with w = -exp(time_decay)."""
    q = torch.maximum(pp, u_A + k_BA)
    e1, e2 = torch.exp(pp - q), torch.exp(u_A + k_BA - q)
    out = (e1 * aa + e2 * v_BA) / (e1 * bb + e2)
    q = torch.maximum(pp + w_A, k_BA)
    e1, e2 = torch.exp(pp + w_A - q), torch.exp(k_BA - q)
    return out, e1 * aa + e2 * v_BA, e1 * bb + e2, q


def mixed(x: torch.Tensor, x_prev: torch.Tensor, time_mix: torch.Tensor) -> torch.Tensor:
    return x * time_mix + x_prev * (1 - time_mix)


def block_step(block: Block, x_BC: torch.Tensor, state: FlatState) -> tuple[torch.Tensor, FlatState]:
    """One block on one token; `state` is this layer's 5 tensors."""
    att, ffn = block.att, block.ffn
    att_x_prev, aa, bb, pp, ffn_x_prev = state
    xa = F.layer_norm(x_BC, x_BC.shape[-1:], block.ln1.weight, block.ln1.bias)
    k = F.linear(mixed(xa, att_x_prev, att.time_mix_k), att.key.weight).float()
    v = F.linear(mixed(xa, att_x_prev, att.time_mix_v), att.value.weight).float()
    r = torch.sigmoid(F.linear(mixed(xa, att_x_prev, att.time_mix_r), att.receptance.weight))
    w, u = -torch.exp(att.time_decay.float()), att.time_first.float()
    wkv_out, aa, bb, pp = wkv_step(w, u, k, v, aa, bb, pp)
    x_BC = x_BC + F.linear(r * wkv_out.to(r.dtype), att.output.weight)

    xf = F.layer_norm(x_BC, x_BC.shape[-1:], block.ln2.weight, block.ln2.bias)
    kf = torch.square(torch.relu(F.linear(mixed(xf, ffn_x_prev, ffn.time_mix_k), ffn.key.weight)))
    rf = torch.sigmoid(F.linear(mixed(xf, ffn_x_prev, ffn.time_mix_r), ffn.receptance.weight))
    x_BC = x_BC + rf * F.linear(kf, ffn.value.weight)
    return x_BC, [xa, aa, bb, pp, xf]


def rnn_step(model: RWKV, token_B: torch.Tensor, state: FlatState | None = None) -> tuple[torch.Tensor, FlatState]:
    """Logits (B, V) for one token per sequence, and the new state (the input state is not mutated)."""
    if state is None:
        state = zero_rnn_state(model, token_B.shape[0])
    x_BC = model.emb(token_B)
    ln0 = model.blocks[0].ln0
    x_BC = F.layer_norm(x_BC, x_BC.shape[-1:], ln0.weight, ln0.bias)
    new_state: FlatState = []
    for i, block in enumerate(model.blocks):
        layer = STATE_TENSORS_PER_LAYER * i
        x_BC, layer_state = block_step(block, x_BC, state[layer : layer + STATE_TENSORS_PER_LAYER])
        new_state += layer_state
    x_BC = F.layer_norm(x_BC, x_BC.shape[-1:], model.ln_out.weight, model.ln_out.bias)
    return F.linear(x_BC, model.head.weight), new_state


def sample_token(logits_V: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Nucleus sampling: softmax(logits / temperature), keep the smallest top set of mass >= top_p.

    temperature == 0 means greedy (arg-max).
    """
    if temperature == 0:
        return int(torch.argmax(logits_V).item())
    probs = torch.softmax(logits_V.double() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0  # the first token always survives (mass_before = 0)
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
    return int(order[choice.to(order.device)].item())


@torch.no_grad()
def generate(
    model: RWKV,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int = 0,
    stop_token: int | None = None,
) -> list[int]:
    """Sample up to `max_new_tokens` continuation tokens of `prompt` (not included in the result).

    The prompt runs in GPT mode in one call, then one RNN step per new token. The same seed gives
    the same tokens. Generation stops after `stop_token` if it is sampled.
    """
    if not prompt:
        raise ValueError("generate needs a prompt of at least one token")
    if not 0 < top_p <= 1 or temperature < 0:
        raise ValueError(f"need 0 < top_p <= 1 and temperature >= 0, got top_p={top_p}, temperature={temperature}")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.tensor([list(prompt)], dtype=torch.long, device=model.emb.weight.device)
    logits, gpt_state = model.forward_with_state(idx)
    logits_V, state = logits[0, -1], flatten_state(gpt_state)
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_token(logits_V.float(), temperature, top_p, generator)
        new_tokens.append(token)
        if token == stop_token:
            break
        step_logits, state = rnn_step(model, idx.new_tensor([token]), state)
        logits_V = step_logits[0]
    return new_tokens
