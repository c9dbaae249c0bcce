"""Mixture-of-experts feed-forward: gpt-oss's router and experts, dropless, on one device.

    x [N, C] ─ router (linear + bias) ─ top-k logits ─ softmax over the k ─ weights [N, k]
             └─ for each chosen expert e: ((up + 1) · gate · σ(α · gate)) W_down[e] + b_down[e],
                gate, up = the even / odd columns of x W_gate_up[e] + b_gate_up[e] (interleaved),
                gate clamped above at ``limit``, up to [-limit, limit]
    y = Σ_k weight_k · expert_k(x)

This is ``GptOssMLP`` of Hugging Face transformers (``models/gpt_oss/modeling_gpt_oss.py``) with the
same parameter names and shapes — ``router.weight`` [E, C], ``router.bias`` [E],
``experts.gate_up_proj`` [E, C, 2F], ``experts.gate_up_proj_bias`` [E, 2F], ``experts.down_proj``
[E, F, C], ``experts.down_proj_bias`` [E, C] — so a checkpoint maps one to one. The experts are
applied in ascending order and their outputs summed into each token as Hugging Face does.

Every token reaches its k experts (no capacity, nothing dropped): a token's output depends on that
token alone, so a sequence shard routes exactly as the whole sequence does and sequence
parallelism needs no communication here.

The forward also returns the router's sums over this call's tokens (``RouterSums``): how many
tokens each expert received and the sum of the full softmax over experts. The load-balancing loss
(Switch Transformer, Fedus et al. 2021, eqs. 4-6, as Hugging Face's ``load_balancing_loss_func``)
is a product of means over the *whole* batch, so the trainer — which knows the ranks — reduces the
counts and forms it (``aux_loss``); the model never knows about ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class RouterSums(NamedTuple):
    counts: torch.Tensor  # [E] fp32, detached: tokens routed to each expert (each token counts k times)
    prob_sum: torch.Tensor  # [E] fp32: Σ over tokens of softmax(router logits) (carries the router's gradient)
    tokens: int  # the tokens of this call


class Experts(nn.Module):
    """E experts with gpt-oss's clamped SwiGLU; see the module docstring."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = alpha, limit
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_ff))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(n_experts, 2 * d_ff))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.down_proj_bias = nn.Parameter(torch.empty(n_experts, d_model))

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, C]; experts, weights [N, k] (chosen expert ids, their routing weights) -> [N, C]."""
        out = torch.zeros_like(x)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # the (token, slot) pairs grouped by expert, in token order
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        k = experts.shape[1]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            token, slot = pairs // k, pairs % k
            h = self.activation(x[token] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e])
            y = (h @ self.down_proj[e] + self.down_proj_bias[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(x.dtype))
        return out


class MoE(nn.Module):
    """Router + experts (``model.n_experts`` > 0); forward [B, T, C] -> ([B, T, C], RouterSums)."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, alpha: float, limit: float):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=True)
        self.experts = Experts(d_model, d_ff, n_experts, alpha, limit)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterSums]:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        logits = self.router(flat)  # (N, E)
        top, chosen = torch.topk(logits, self.top_k, dim=-1)  # (N, k)
        weights = F.softmax(top, dim=-1, dtype=top.dtype)
        y = self.experts(flat, chosen, weights)
        counts = torch.bincount(chosen.reshape(-1), minlength=logits.shape[1]).float()
        prob_sum = F.softmax(logits.float(), dim=-1).sum(0)
        return y.reshape(B, T, C), RouterSums(counts, prob_sum, flat.shape[0])


def merge_router_sums(sums: Sequence[RouterSums]) -> RouterSums:
    """One ``RouterSums`` over layers (Hugging Face's loss pools every layer's rows)."""
    return RouterSums(torch.stack([s.counts for s in sums]).sum(0), torch.stack([s.prob_sum for s in sums]).sum(0),
                      sum(s.tokens for s in sums))


def aux_loss(local: RouterSums, total_counts: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """This call's share of the load-balancing loss E · Σ_e f_e · P_e, where over every token of the
    batch (all layers pooled) f_e = counts_e / tokens and P_e = mean softmax probability of e.

    ``total_counts`` / ``total_tokens``: the counts and tokens summed over every shard of the batch
    (the trainer all-reduces them; one device: ``local``'s own). The shares of all shards sum to the
    loss, and each share's gradient is that shard's part of the loss's gradient (f carries none, as
    in Hugging Face, where it comes from a top-k), so summing shard gradients — what the trainer's
    gradient reduction does — gives the single-device gradient. f sums to k over the experts, as
    Hugging Face's does (it divides the top-k counts by the rows, not by k·rows)."""
    n = float(total_tokens)
    E = local.prob_sum.shape[0]
    return E * torch.sum((total_counts / n) * (local.prob_sum / n))
