"""Super-kernel programs: R same-architecture models run as one batched program.

The weights of the R tenants are stacked once, when the program is built
(``torch.func.stack_module_state``), along a new leading dimension. Three kinds of model:

- **Recurrent modules** (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells) as the tenant itself:
  an explicit super-kernel written with torch ops — per layer one ``baddbmm`` projects every
  timestep's input for all R tenants, then per timestep one ``baddbmm`` over the R tenants'
  recurrent weights (the paper's RNN case: R small mat-vecs become one batched GEMM).
  ``vmap`` cannot do this: it has no batching rule for ``aten::lstm``.
- **Models containing recurrent modules or attention** (``nn.MultiheadAttention``, and the
  transformer encoder layers built on it): ``vmap`` over ``functional_call`` as below, with those
  submodules swapped, in the program's weightless copy of the model, for the same computation
  written in plain torch ops (matmuls, softmax, the gate arithmetic), which ``vmap`` batches into
  batched GEMMs over the tenants. Without the swap, ``vmap`` fails on ``aten::lstm`` and falls
  back to a per-tenant loop for the fused attention kernels.
- **Anything else**: ``vmap`` over ``functional_call`` (torch's model-ensembling recipe).

A program's ``call(params, buffers, xs)`` takes ``xs`` as [R, rows, ...] (slot ``i``'s rows
through tenant ``i``'s weights) and returns the tenants' outputs stacked the same way (a tuple
output: each of its tensors stacked).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

__all__ = ["stack_modules", "rnn_stacked", "cell_stacked", "attention"]

RNNS = (nn.LSTM, nn.GRU, nn.RNN)
CELLS = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)


def stack_modules(modules: list):
    """``(params, buffers, call)`` of one super-kernel program over ``modules`` (see the module
    docstring). The stacked ``params``/``buffers`` are the program's own copy of the weights."""
    params, buffers = stack_module_state(modules)
    first = modules[0]
    if type(first) in RNNS and not _unsupported_rnn(first):
        def call(params, buffers, xs):
            return rnn_stacked(first, lambda name: params[name], xs)
        return params, buffers, call
    if type(first) in CELLS:
        def call(params, buffers, xs):
            return cell_stacked(first, lambda name: params[name], xs)
        return params, buffers, call
    base = copy.deepcopy(first).to("meta")
    _swap_for_vmap(base)

    def one(p, b, x):
        return functional_call(base, (p, b), (x,))

    batched = torch.vmap(one, in_dims=(0, 0, 0))
    return params, buffers, batched


# -- recurrent super-kernels ------------------------------------------------------------------------
def _unsupported_rnn(m) -> bool:
    return m.training and m.dropout > 0   # dropout between layers: only in training


def _cell_step(mode: str, gx, gh, h, c, nonlinearity: str = "tanh"):
    """One timestep for all tenants from the input and hidden projections (biases included)."""
    if mode == "LSTM":
        i, f, g, o = (gx + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        xr, xz, xn = gx.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, c
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    return act(gx + gh), c


def _project(x, w, b):
    """``x @ w^T + b`` for every tenant at once: x [R, n, in], w [R, out, in], b [R, out] or None."""
    wt = w.transpose(1, 2)
    return torch.bmm(x, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x, wt)


def _mode(m) -> str:
    return {nn.LSTM: "LSTM", nn.GRU: "GRU", nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}.get(
        next(c for c in type(m).__mro__ if c in RNNS + CELLS), "RNN")


def rnn_stacked(m, weight, xs, hx=None):
    """``nn.LSTM``/``nn.GRU``/``nn.RNN`` ``m``'s forward for R tenants at once: ``weight(name)``
    gives the stacked [R, ...] parameter ``name``, ``xs`` is [R, *input shape of m]. Returns what
    ``m`` returns, each tensor with a leading tenant dimension."""
    mode, dirs, layers = _mode(m), 2 if m.bidirectional else 1, m.num_layers
    hidden = m.hidden_size
    out_size = getattr(m, "proj_size", 0) or hidden
    unbatched = xs.dim() == 3                     # [R, T, in]
    if unbatched:
        x = xs.unsqueeze(1)                       # [R, 1, T, in]: a batch of one, batch first
    else:
        x = xs if m.batch_first else xs.transpose(1, 2)   # [R, B, T, in]
    R, B, T = x.shape[:3]
    if hx is not None:
        h0, c0 = hx if mode == "LSTM" else (hx, None)
        if unbatched:
            h0 = h0.unsqueeze(2)
            c0 = None if c0 is None else c0.unsqueeze(2)
    else:
        h0 = x.new_zeros((R, layers * dirs, B, out_size))
        c0 = x.new_zeros((R, layers * dirs, B, hidden)) if mode == "LSTM" else None
    hn, cn = [], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            k = layer * dirs + d
            w_ih, w_hh = weight("weight_ih" + sfx), weight("weight_hh" + sfx)
            b_ih = weight("bias_ih" + sfx) if m.bias else None
            b_hh = weight("bias_hh" + sfx) if m.bias else None
            w_hr = weight("weight_hr" + sfx) if mode == "LSTM" and m.proj_size else None
            gx = _project(x.reshape(R, B * T, x.shape[-1]), w_ih, b_ih).reshape(R, B, T, -1)
            h, c = h0[:, k], (c0[:, k] if c0 is not None else None)
            steps = []
            for t in (range(T - 1, -1, -1) if d else range(T)):
                h, c = _cell_step(mode, gx[:, :, t], _project(h, w_hh, b_hh), h, c, getattr(m, "nonlinearity", "tanh"))
                if w_hr is not None:
                    h = torch.bmm(h, w_hr.transpose(1, 2))
                steps.append(h)
            if d:
                steps.reverse()
            outs.append(torch.stack(steps, 2))
            hn.append(h)
            cn.append(c)
        x = outs[0] if dirs == 1 else torch.cat(outs, -1)
    h_n = torch.stack(hn, 1)
    c_n = torch.stack(cn, 1) if mode == "LSTM" else None
    out = x
    if unbatched:
        out, h_n = out.squeeze(1), h_n.squeeze(2)
        c_n = None if c_n is None else c_n.squeeze(2)
    elif not m.batch_first:
        out = out.transpose(1, 2)
    return (out, (h_n, c_n)) if mode == "LSTM" else (out, h_n)


def cell_stacked(m, weight, xs, hx=None):
    """An RNN cell's forward (``nn.LSTMCell``/``GRUCell``/``RNNCell``) for R tenants at once
    (``xs``: [R, B, in], or [R, in] unbatched)."""
    mode = _mode(m)
    unbatched = xs.dim() == 2
    x = xs.unsqueeze(1) if unbatched else xs
    R, B = x.shape[:2]
    if hx is None:
        h = x.new_zeros((R, B, m.hidden_size))
        c = x.new_zeros((R, B, m.hidden_size)) if mode == "LSTM" else None
    else:
        h, c = hx if mode == "LSTM" else (hx, None)
        if unbatched:
            h, c = h.unsqueeze(1), None if c is None else c.unsqueeze(1)
    b_ih = weight("bias_ih") if m.bias else None
    b_hh = weight("bias_hh") if m.bias else None
    h, c = _cell_step(mode, _project(x, weight("weight_ih"), b_ih), _project(h, weight("weight_hh"), b_hh), h, c,
                      getattr(m, "nonlinearity", "tanh"))
    if unbatched:
        h, c = h.squeeze(1), None if c is None else c.squeeze(1)
    return (h, c) if mode == "LSTM" else h


# -- swaps for vmap: the same computation in batchable torch ops --------------------------------------
def _one(t):
    return None if t is None else t.unsqueeze(0)


def _unstack(out):
    if isinstance(out, tuple):
        return tuple(_unstack(o) for o in out)
    return None if out is None else out.squeeze(0)


class _VmapRNN:
    """Mixin for a recurrent module inside a vmapped model: the explicit super-kernel with one
    tenant (vmap batches its bmm over the program's tenants)."""

    def forward(self, input, hx=None):
        hx = None if hx is None else (tuple(map(_one, hx)) if isinstance(hx, tuple) else _one(hx))
        return _unstack(rnn_stacked(self, lambda name: _one(getattr(self, name)), input.unsqueeze(0), hx))


class _VmapCell:
    def forward(self, input, hx=None):
        hx = None if hx is None else (tuple(map(_one, hx)) if isinstance(hx, tuple) else _one(hx))
        return _unstack(cell_stacked(self, lambda name: _one(getattr(self, name)), input.unsqueeze(0), hx))


def attention(m: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
              average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention``'s forward (eval) with plain matmuls and softmax, which ``vmap``
    batches (torch's fused attention kernels have no batching rule)."""
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    E, heads = m.embed_dim, m.num_heads
    d = E // heads
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    b_q = b_k = b_v = None
    if m.in_proj_bias is not None:
        b_q, b_k, b_v = m.in_proj_bias.chunk(3)
    B, L, S = query.shape[0], query.shape[1], key.shape[1]
    q = nn.functional.linear(query, w_q, b_q).reshape(B, L, heads, d).transpose(1, 2)
    k = nn.functional.linear(key, w_k, b_k).reshape(B, S, heads, d).transpose(1, 2)
    v = nn.functional.linear(value, w_v, b_v).reshape(B, S, heads, d).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d)     # [B, heads, L, S]
    if attn_mask is not None:
        mask = attn_mask.reshape(B, heads, L, S) if attn_mask.dim() == 3 else attn_mask
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if key_padding_mask is not None:
        pad = key_padding_mask.reshape(B, 1, 1, S)
        scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
    weights = torch.softmax(scores, -1)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(B, L, E)
    out = m.out_proj(out)
    if unbatched:
        out, weights = out.squeeze(0), weights.squeeze(0)
    elif not m.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, (weights.mean(-3) if average_attn_weights else weights)


class _VmapAttention:
    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                         is_causal)


class _VmapEncoderLayer:
    """``nn.TransformerEncoderLayer`` without its fused fast path (no batching rule)."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


def _attention_supported(m: nn.MultiheadAttention) -> bool:
    return m.bias_k is None and m.bias_v is None and not m.add_zero_attn and not m.training


_SWAPS = ((RNNS, _VmapRNN, lambda m: not _unsupported_rnn(m)), (CELLS, _VmapCell, lambda m: True),
          ((nn.MultiheadAttention,), _VmapAttention, _attention_supported),
          ((nn.TransformerEncoderLayer,), _VmapEncoderLayer, lambda m: not m.training))
_classes: dict = {}


def _swap_for_vmap(base) -> None:
    """Give ``base``'s recurrent and attention submodules (and ``base`` itself) a class whose
    forward ``vmap`` can batch; same parameters and settings, so ``functional_call`` binds."""
    for m in base.modules():
        for kinds, mixin, ok in _SWAPS:
            if type(m) in kinds and ok(m):
                cls = type(m)
                if cls not in _classes:
                    _classes[cls] = type(f"Vmap{cls.__name__}", (mixin, cls), {})
                m.__class__ = _classes[cls]
