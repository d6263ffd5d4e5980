"""Traceable decompositions of modules that torch.fx would keep as opaque leaves.

``nn.MultiheadAttention`` is a leaf for torch.fx, so its projections and matmuls would stay float (torch.ao
cannot quantize it: pytorch issue 53026). :func:`decompose_attention` swaps each one, in a copy of the
model, for :class:`DecomposedMultiheadAttention`: the same function written with ``nn.Linear`` projections, which
the tracer traces into and the backend tables quantize, around one float attention leaf
(:class:`ScaledDotProductAttention`).

Example:
    >>> import torch
    >>> mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    >>> dec = DecomposedMultiheadAttention.from_float(mha)
    >>> x = torch.randn(2, 5, 16)
    >>> torch.allclose(dec(x, x, x)[0], mha(x, x, x)[0], atol=1e-5)
    True

torchvision's Swin attention (``ShiftedWindowAttention`` and its V2) is traced into, but its body is one
``torch.fx.wrap``-ped function (shape-dependent padding, shifts and masks) that takes the projection weights as
tensors: both projections stayed float, the largest cost of an int8 Swin. :class:`DecomposedShiftedWindowAttention`
calls its ``qkv`` and ``proj`` as the ``nn.Linear`` modules they are, around one float leaf module
(:class:`WindowAttention`, running :func:`window_attention`) for what lies between them. The projections work
token by token, so they commute with the leaf's padding, shifts and window partitions; the module keeps the
original's parameter and buffer names, so a prepared model's state_dict keys are the float model's.

torchvision's MaxViT attention is traced into too, but its scores and softmax would quantize as two matmuls and a
softmax, each dequantizing its inputs and quantizing its output: :class:`DecomposedRelativePositionalAttention`
keeps ``to_qkv`` and ``merge`` as modules around one float leaf (:class:`RelativePositionAttention`), again with
the original's names.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DecomposedMultiheadAttention", "DecomposedRelativePositionalAttention", "DecomposedShiftedWindowAttention",
           "RelativePositionAttention", "ScaledDotProductAttention", "WindowAttention",
           "decompose_attention", "window_attention"]


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


def _mask(scores: torch.Tensor, key_padding_mask: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor],
          is_causal: bool) -> torch.Tensor:
    """``scores`` ``[batch, heads, tokens, source tokens]`` with nn.MultiheadAttention's masks applied (a bool mask
    is True where attention is not allowed: -inf there; a float mask is added)."""
    if attn_mask is None and is_causal:
        n, m = scores.size(-2), scores.size(-1)
        attn_mask = torch.ones(n, m, dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        if attn_mask.dim() == 3:  # [batch * heads, tokens, source tokens]
            attn_mask = attn_mask.reshape(scores.shape)
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


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T + mask) v of ``[B, heads, tokens, head_dim]`` queries, keys and values as a leaf module (float:
    no kernel), with ``nn.MultiheadAttention``'s masks (a bool mask is True where attention is *not* allowed) and its
    attention dropout acting in train mode only (read when the module runs, not when the model was traced).

    The queries come scaled (the decomposition folds 1/sqrt(head_dim) into their projection). One float
    ``scaled_dot_product_attention`` between the int8 projections replaces two quantized matmuls and a quantized
    softmax, each of which dequantized its inputs and quantized its output again: fewer passes over the
    ``tokens x tokens`` scores, and no rounding of the scores or of the probabilities."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = float(dropout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        mask: Optional[torch.Tensor] = None
        if attn_mask is not None or key_padding_mask is not None:
            zeros = q.new_zeros(q.size(0), q.size(1), q.size(2), k.size(2))
            mask = _mask(zeros, key_padding_mask, attn_mask, is_causal)
            is_causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                              is_causal=is_causal, scale=1.0)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"


class DecomposedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` as traceable parts; the 1/sqrt(head_dim) scale is folded into the query
    projection so no scalar multiply sits between quantized ops. Called with ``need_weights=False`` (as torchvision's
    ViT and most encoders call it), what lies between the projections is one float leaf,
    :class:`ScaledDotProductAttention`. Asked for the attention weights, it computes them with ``torch.matmul`` and
    ``torch.softmax``, which the backend tables quantize, and an ``nn.Dropout`` module on the probabilities (active
    in train mode, removed from eval graphs)."""

    _fxquant_traceable = True

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool, q_proj: nn.Linear, k_proj: nn.Linear,
                 v_proj: nn.Linear, out_proj: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.attend = ScaledDotProductAttention(dropout)
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
        if not need_weights:
            k = self.k_proj(key).reshape(bsz, src, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(value).reshape(bsz, src, self.num_heads, self.head_dim).transpose(1, 2)
            out = self.attend(q, k, v, attn_mask, key_padding_mask, is_causal)
            out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt, self.embed_dim))
            return (out if self.batch_first else out.transpose(0, 1)), None
        k = self.k_proj(key).reshape(bsz, src, self.num_heads, self.head_dim).permute(0, 2, 3, 1)
        v = self.v_proj(value).reshape(bsz, src, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k)
        scores = _mask(scores, key_padding_mask, attn_mask, is_causal)
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(self.dropout(attn), v).transpose(1, 2).reshape(bsz, tgt, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, attn.mean(dim=1) if average_attn_weights else attn


def _shift_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of shifted windows, ``[windows, 1, tokens, tokens]``: -100 between tokens that
    the cyclic shift brought from different regions of the map, else 0 (torchvision's mask). Built on each call,
    as torchvision does: a cache would hold tensors of every map size seen, and fake ones while exporting."""
    region = torch.zeros(pad_h, pad_w, device=device, dtype=dtype)
    rows = [0, pad_h - window[0], pad_h - shift[0], pad_h]
    cols = [0, pad_w - window[1], pad_w - shift[1], pad_w]
    for i in range(3):
        for j in range(3):
            region[rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = float(3 * i + j)
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1]).permute(0, 2, 1, 3)
    region = region.reshape(-1, window[0] * window[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return (diff != 0).to(dtype).mul(-100.0).unsqueeze(1)


def window_attention(qkv: torch.Tensor, relative_position_bias: torch.Tensor, window_size: list[int],
                     shift_size: list[int], num_heads: int, qkv_bias: Optional[torch.Tensor] = None,
                     logit_scale: Optional[torch.Tensor] = None, attention_dropout: float = 0.0,
                     training: bool = False) -> torch.Tensor:
    """Shifted-window attention between the projections: ``qkv`` is the ``[B, H, W, 3C]`` output of the qkv
    projection; returns the ``[B, H, W, C]`` input of the output projection, in ``qkv``'s dtype.

    torchvision pads the map to whole windows before projecting, so a padded token's qkv is the projection's bias:
    here it is padded with that bias. With ``logit_scale`` (V2's cosine attention) the key bias is not used, as in
    torchvision: it is subtracted from the keys again. Otherwise the steps of
    ``torchvision.models.swin_transformer.shifted_window_attention``: cyclic shift (none along an axis a window
    covers), partition, scaled or cosine scores plus the relative position bias and the shift mask, softmax,
    dropout and the weighted values (those five in one ``scaled_dot_product_attention``), windows reversed, shift
    undone, padding cut.
    """
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    dtype = qkv.dtype
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    key_bias: Optional[torch.Tensor] = None  # V2's key bias, to subtract from the keys after the partition
    if logit_scale is not None and qkv_bias is not None:
        if torch.is_grad_enabled() and qkv_bias.requires_grad:
            # training: subtracted before padding, so its gradient (the projection's minus the subtraction's) is
            # zero up to rounding, as torchvision's is zero; padded keys are 0 with no path to it (their gradient
            # through the normalisation of a zero vector is huge: it must not reach the bias at all)
            qkv = qkv - F.pad(qkv_bias[c:2 * c], [c, c]).to(dtype)
            qkv_bias = torch.cat([qkv_bias[:c], qkv_bias.new_zeros(c), qkv_bias[2 * c:]])
        else:  # a third of the work: the keys alone (padded keys are then the bias minus itself: 0)
            key_bias = qkv_bias[c:2 * c]
    if pad_b > 0 or pad_r > 0:
        fill = qkv.new_zeros(c3) if qkv_bias is None else qkv_bias.to(dtype)
        padded = fill.expand(b, h + pad_b, w + pad_r, c3).clone()
        padded[:, :h, :w] = qkv
        qkv = padded
    pad_h, pad_w = h + pad_b, w + pad_r
    shift = [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]
    shifted = shift[0] > 0 or shift[1] > 0
    if shifted:
        qkv = torch.roll(qkv, shifts=[-shift[0], -shift[1]], dims=[1, 2])
    nh, nw, tokens = pad_h // window_size[0], pad_w // window_size[1], window_size[0] * window_size[1]
    qkv = qkv.view(b, nh, window_size[0], nw, window_size[1], c3).permute(0, 1, 3, 2, 4, 5)
    qkv = qkv.reshape(b * nh * nw, tokens, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale: Optional[float] = None
    if logit_scale is not None:  # cosine scores, times a learned per-head scale
        if key_bias is not None:  # V2 projects keys without their bias
            k = k - key_bias.to(dtype).view(num_heads, 1, c // num_heads)
        q = F.normalize(q, dim=-1) * torch.clamp(logit_scale, max=math.log(100.0)).exp().to(dtype)
        k, scale = F.normalize(k, dim=-1), 1.0
    bias = relative_position_bias.to(dtype)
    if shifted:
        mask = _shift_mask(pad_h, pad_w, window_size, shift, qkv.device, dtype)
        bias = (bias + mask).unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(-1, num_heads, tokens, tokens)
    # one fused kernel for scores + bias, softmax, dropout and the weighted values (torchvision: two batched
    # matmuls of 49 x 32 matrices and a softmax in between, the largest float cost of an int8 Swin)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attention_dropout if training else 0.0,
                                         scale=scale)
    out = out.transpose(1, 2).reshape(b, nh, nw, window_size[0], window_size[1], c)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
    if shifted:
        out = torch.roll(out, shifts=[shift[0], shift[1]], dims=[1, 2])
    return out[:, :h, :w, :].contiguous()


class WindowAttention(nn.Module):
    """:func:`window_attention` as a leaf module (float: no kernel), so its attention dropout follows the module's
    train / eval mode when it runs (a function's ``training`` argument would be fixed when the model is traced)."""

    def __init__(self, window_size: list[int], shift_size: list[int], num_heads: int,
                 attention_dropout: float) -> None:
        super().__init__()
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.attention_dropout = num_heads, float(attention_dropout)

    def forward(self, qkv: torch.Tensor, relative_position_bias: torch.Tensor,
                qkv_bias: Optional[torch.Tensor] = None, logit_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        return window_attention(qkv, relative_position_bias, self.window_size, self.shift_size, self.num_heads,
                                qkv_bias, logit_scale, self.attention_dropout, self.training)

    def extra_repr(self) -> str:
        return (f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}, "
                f"attention_dropout={self.attention_dropout}")


@torch.fx.wrap
def relative_position_bias(table: torch.Tensor, index: torch.Tensor, window_size: list[int],
                           cosine: bool = False) -> torch.Tensor:
    """The ``[1, heads, tokens, tokens]`` bias gathered from a ``[entries, heads]`` table (V2: ``16 * sigmoid``
    of its continuous-position MLP's output)."""
    n = window_size[0] * window_size[1]
    bias = table[index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    return 16 * torch.sigmoid(bias) if cosine else bias


class DecomposedShiftedWindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2`` with its ``qkv`` and ``proj``
    linears called as modules (so they quantize) around a :class:`WindowAttention` leaf. It holds the original's
    parameters, buffers and submodules under the same names (the same objects: nothing is copied); both dropouts
    are modules, so they act in train mode only, whatever mode the model was traced in."""

    _fxquant_traceable = True

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.window_size, self.shift_size = list(original.window_size), list(original.shift_size)
        self.num_heads = original.num_heads
        self.cosine = hasattr(original, "logit_scale")
        self.qkv, self.proj = original.qkv, original.proj
        if self.cosine:
            self.logit_scale = original.logit_scale
            self.cpb_mlp = original.cpb_mlp
            self.register_buffer("relative_coords_table", original.relative_coords_table)
        else:
            self.relative_position_bias_table = original.relative_position_bias_table
        self.register_buffer("relative_position_index", original.relative_position_index)
        self.attend = WindowAttention(self.window_size, self.shift_size, self.num_heads, original.attention_dropout)
        self.proj_dropout = nn.Dropout(float(original.dropout))
        self.train(original.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
            logit_scale = self.logit_scale
        else:
            table, logit_scale = self.relative_position_bias_table, None
        bias = relative_position_bias(table, self.relative_position_index, self.window_size, self.cosine)
        out = self.attend(self.qkv(x), bias, self.qkv.bias, logit_scale)
        return self.proj_dropout(self.proj(out))


class RelativePositionAttention(nn.Module):
    """What lies between the projections of torchvision's MaxViT attention, as a float leaf module: the ``[B, G, P,
    3 D]`` qkv split into heads, scores scaled by ``feat_dim ** -0.5`` (MaxViT scales by the feature width, not
    the head width) plus the ``[1, heads, P, P]`` relative position bias, softmax, weighted values, heads merged
    back to ``[B, G, P, D]``; one ``scaled_dot_product_attention`` in place of two matmuls and a softmax."""

    def __init__(self, num_heads: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.scale = int(num_heads), float(scale)

    def forward(self, qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, g, p, d3 = qkv.shape
        d = d3 // 3
        qkv = qkv.reshape(b * g, p, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias.to(qkv.dtype), scale=self.scale)
        return out.transpose(1, 2).reshape(b, g, p, d)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, scale={self.scale:.6g}"


class DecomposedRelativePositionalAttention(nn.Module):
    """torchvision's MaxViT ``RelativePositionalMultiHeadAttention`` with its ``to_qkv`` and ``merge`` linears
    called as modules (quantized) around a :class:`RelativePositionAttention` leaf. It holds the original's
    parameters and buffers under the same names (the same objects)."""

    _fxquant_traceable = True

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.size = original.size  # the window side: the bias is [heads, size^2, size^2]
        self.to_qkv, self.merge = original.to_qkv, original.merge
        self.relative_position_bias_table = original.relative_position_bias_table
        self.register_buffer("relative_position_index", original.relative_position_index)
        self.attend = RelativePositionAttention(original.n_heads, original.scale_factor)
        self.train(original.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = relative_position_bias(self.relative_position_bias_table, self.relative_position_index.view(-1),
                                      [self.size, self.size])
        return self.merge(self.attend(self.to_qkv(x), bias))


_MAXVIT_ATTENTION = ("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention")
_SWIN_ATTENTION = {("torchvision.models.swin_transformer", "ShiftedWindowAttention"),
                   ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2")}


def decompose_attention(model: nn.Module) -> list[str]:
    """Replace every decomposable ``nn.MultiheadAttention`` and torchvision Swin attention in ``model`` (in place:
    call it on a copy).

    Returns:
        The qualified names of the replaced modules.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        kind = (type(module).__module__, type(module).__name__)
        if kind in _SWIN_ATTENTION:
            new: nn.Module = DecomposedShiftedWindowAttention(module)
        elif kind == _MAXVIT_ATTENTION:
            new = DecomposedRelativePositionalAttention(module)
        elif type(module) is not nn.MultiheadAttention:
            continue
        else:
            try:
                new = DecomposedMultiheadAttention.from_float(module)
            except ValueError:
                continue
        new.train(module.training)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        replaced.append(name)
    return replaced
