"""Traceable decompositions of modules that torch.fx would keep as opaque leaves.

``nn.MultiheadAttention`` is a leaf for torch.fx, so its projections and matmuls would stay float (torch.ao
cannot quantize it: pytorch issue 53026). :func:`decompose_attention` swaps each one, in a copy of the
model, for :class:`DecomposedMultiheadAttention`: the same function written with ``nn.Linear`` projections,
``torch.matmul`` and ``torch.softmax``, which the tracer traces into and the backend tables quantize.

Example:
    >>> import torch
    >>> mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    >>> dec = DecomposedMultiheadAttention.from_float(mha)
    >>> x = torch.randn(2, 5, 16)
    >>> torch.allclose(dec(x, x, x)[0], mha(x, x, x)[0], atol=1e-5)
    True
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["DecomposedMultiheadAttention", "decompose_attention"]


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float = 1.0) -> nn.Linear:
    """An ``nn.Linear`` computing with ``weight`` and ``bias`` (times ``scale``). It is built on the meta device,
    then given the tensors: no random initialisation to overwrite (that was 0.26 s of vit_b_16's prepare), and
    unscaled weights are not copied (views of the attention's ``in_proj_weight``, which prepare_fx reads in place
    like every other float weight)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    with torch.no_grad():
        lin.weight = nn.Parameter(weight.detach() * scale if scale != 1.0 else weight.detach(),
                                  requires_grad=weight.requires_grad)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach() * scale if scale != 1.0 else bias.detach(),
                                    requires_grad=bias.requires_grad)
    return lin


class DecomposedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` as traceable parts; the 1/sqrt(head_dim) scale is folded into the query
    projection so no scalar multiply sits between quantized ops. The attention-probability dropout is an
    ``nn.Dropout`` module: active in train mode (quantization-aware training), removed from eval graphs."""

    _fxquant_traceable = True

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool, q_proj: nn.Linear, k_proj: nn.Linear,
                 v_proj: nn.Linear, out_proj: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "DecomposedMultiheadAttention":
        """The decomposition of ``mha`` (raises ``ValueError`` for add_bias_kv / add_zero_attn, kept as leaves)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn attention is not decomposed")
        e, h = mha.embed_dim, mha.num_heads
        scale = 1.0 / math.sqrt(e // h)
        bias = mha.in_proj_bias
        b = [None, None, None] if bias is None else [bias[:e], bias[e:2 * e], bias[2 * e:]]
        if mha._qkv_same_embed_dim:
            w = [mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e], mha.in_proj_weight[2 * e:]]
        else:
            w = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        out = _linear(mha.out_proj.weight, mha.out_proj.bias)
        return cls(e, h, mha.batch_first, _linear(w[0], b[0], scale), _linear(w[1], b[1]), _linear(w[2], b[2]), out,
                   dropout=float(mha.dropout))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        bsz, tgt, src = query.size(0), query.size(1), key.size(1)
        q = self.q_proj(query).reshape(bsz, tgt, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).reshape(bsz, src, self.num_heads, self.head_dim).permute(0, 2, 3, 1)
        v = self.v_proj(value).reshape(bsz, src, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k)
        scores = self._mask(scores, key_padding_mask, attn_mask, is_causal)
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(self.dropout(attn), v).transpose(1, 2).reshape(bsz, tgt, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn

    @staticmethod
    def _mask(scores: torch.Tensor, key_padding_mask: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor],
              is_causal: bool) -> torch.Tensor:
        if attn_mask is None and is_causal:
            n, m = scores.size(-2), scores.size(-1)
            attn_mask = torch.ones(n, m, dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        if key_padding_mask is not None:
            pad = key_padding_mask.reshape(key_padding_mask.size(0), 1, 1, key_padding_mask.size(1))
            if pad.dtype == torch.bool:
                scores = scores.masked_fill(pad, float("-inf"))
            else:
                scores = scores + pad
        return scores


def decompose_attention(model: nn.Module) -> list[str]:
    """Replace every decomposable ``nn.MultiheadAttention`` in ``model`` (in place: call it on a copy).

    Returns:
        The qualified names of the replaced modules.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.MultiheadAttention:
            continue
        try:
            new = DecomposedMultiheadAttention.from_float(module)
        except ValueError:
            continue
        new.train(module.training)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        replaced.append(name)
    return replaced
