"""Entries shared by the CPU backends: the same ops, parametrised by each backend's weight rule and limits.

Each backend file calls :func:`cnn_entries` with its own facts; nothing here is backend-specific.
"""

from __future__ import annotations

from typing import Optional

import torch

from fxquant import fused, qat
from fxquant.backends import ops
from fxquant.backends.config import Constraints, DTypeConfig, Observation, OpEntry, OpKind, WeightRule

__all__ = ["cnn_entries", "dynamic_entries", "SHARES_INPUT_KINDS", "LEAVES_GRID_KINDS", "LAYOUT_KINDS",
           "FIXED_QPARAMS"]

_U8 = DTypeConfig(input=torch.quint8, output=torch.quint8)
_U8_WEIGHTED = DTypeConfig(input=torch.quint8, output=torch.quint8, weight=torch.qint8, bias=torch.float32)

#: ops whose quantized output has the qparams of their input; they run natively on quantized tensors
SHARES_INPUT_KINDS: tuple[OpKind, ...] = (
    ops.RELU, ops.RELU6, ops.HARDTANH, ops.CLAMP, ops.MAXPOOL, ops.AVGPOOL, ops.ADAPTIVE_AVGPOOL,
    ops.FLATTEN, ops.RESHAPE, ops.PERMUTE, ops.TRANSPOSE, ops.CONTIGUOUS, ops.SQUEEZE, ops.UNSQUEEZE,
    ops.CHUNK, ops.GETITEM, ops.MEAN, ops.DROPOUT, ops.IDENTITY, ops.CHANNEL_SHUFFLE, ops.INTERPOLATE,
    ops.SPLIT, ops.PIXEL_SHUFFLE, ops.PIXEL_UNSHUFFLE, ops.PAD, ops.EXPAND, ops.REPEAT, ops.GELU,
)

#: shares-input ops that only move values (no value changes, none mixed): a tensor keeps its meaning through them
LAYOUT_KINDS: tuple[OpKind, ...] = (ops.RESHAPE, ops.PERMUTE, ops.TRANSPOSE, ops.CONTIGUOUS, ops.FLATTEN, ops.SQUEEZE,
                                    ops.UNSQUEEZE)

#: shares-input ops whose result can leave the input's integer grid (the quantized op rounds it back)
LEAVES_GRID_KINDS: tuple[OpKind, ...] = (ops.RELU6, ops.HARDTANH, ops.CLAMP, ops.AVGPOOL, ops.ADAPTIVE_AVGPOOL,
                                         ops.MEAN, ops.INTERPOLATE, ops.GELU)

#: fixed output ranges of bounded functions on quint8: (scale, zero_point)
FIXED_QPARAMS: dict[str, tuple[float, int]] = {
    "sigmoid": (1.0 / 256.0, 0),
    "hardsigmoid": (1.0 / 256.0, 0),
    "tanh": (2.0 / 256.0, 128),
}


def _weighted(name: str, op: OpKind, patterns: tuple[tuple[OpKind, ...], ...], fuser, lowering: str,
              weight: WeightRule, limits: Constraints, doc: str, qat_fuser=None,
              qat_op: Optional[OpKind] = None) -> OpEntry:
    return OpEntry(name=name, op=op, observation=Observation.OWN, dtypes=(_U8_WEIGHTED,), patterns=patterns,
                   fuser=fuser, qat_fuser=qat_fuser, qat_op=qat_op, weight=weight, constraints=limits,
                   lowering=lowering, quantized_args=(0,), doc=doc)


def _norm_and_activation_entries() -> list[OpEntry]:
    """Norms and activations with float parameters and their own output observer."""
    own = [("layer_norm", ops.LAYER_NORM, "layer_norm", (), "LayerNorm (float affine parameters)"),
           ("group_norm", ops.GROUP_NORM, "group_norm", (), "GroupNorm"),
           ("instance_norm", ops.INSTANCE_NORM, "instance_norm", (), "InstanceNorm1d/2d/3d"),
           ("elu", ops.ELU, "elu", (("alpha", 1, 1.0),), "ELU"),
           ("leaky_relu", ops.LEAKY_RELU, "leaky_relu", (("negative_slope", 1, 0.01),), "LeakyReLU"),
           ("prelu", ops.PRELU, "prelu", (), "PReLU with one slope (runs as leaky_relu)")]
    return [OpEntry(name, kind, Observation.OWN, (_U8,), ((kind,),), lowering=lowering, quantized_args=(0,),
                    op_args=args, doc=doc) for name, kind, lowering, args, doc in own]


def _transposed_entries(weight: WeightRule, limits: Constraints) -> list[OpEntry]:
    """ConvTranspose1d/2d/3d: per-tensor weights only (the kernels reject per-channel), batch norm folded."""
    rule = WeightRule(dtype=weight.dtype, qschemes=tuple(q for q in weight.qschemes if q in
                                                         (torch.per_tensor_symmetric, torch.per_tensor_affine)), axis=1)
    kinds = ((1, ops.CONV_TRANSPOSE1D, ops.BN1D), (2, ops.CONV_TRANSPOSE2D, ops.BN2D), (3, ops.CONV_TRANSPOSE3D, ops.BN3D))
    return [_weighted(f"conv_transpose{n}d", kind, ((kind,), (kind, bn)), fused.fuse_conv_bn, f"conv_transpose{n}d",
                      rule, limits, f"ConvTranspose{n}d, batch norm folded in") for n, kind, bn in kinds]


def cnn_entries(weight: WeightRule, weighted_limits: Constraints, conv2d_limits: Optional[Constraints] = None,
                binary_limits: Constraints = Constraints(),
                conv3d_limits: Optional[Constraints] = None, gelu_own_grid: bool = False) -> tuple[OpEntry, ...]:
    """The conv/linear/elementwise/shape entries of a CPU backend.

    Args:
        weight: the weight rule of conv and linear kernels.
        weighted_limits: constraints of conv and linear kernels.
        conv2d_limits: constraints of 2-d convs if they differ (fbgemm's depthwise fast path).
        binary_limits: constraints of add/mul kernels (qnnpack's scale ratios).
        conv3d_limits: constraints of 3-d convs if they differ (fbgemm's depthwise weight range).
        gelu_own_grid: GELU gets its own output observer and a ``gelu`` lowering (the quantized-tensor kernels:
            GELU's output range, from about -0.17 up, is not its input's, and on its input's grid the negative half
            of the codes goes unused); without it GELU shares its input's grid (oneDNN fuses it into the linear).

    Returns:
        The entries, in table order.
    """
    c2 = conv2d_limits or weighted_limits
    entries: list[OpEntry] = []
    for n, conv, bn, conv_relu, qat_conv, qat_conv_relu in (
            (1, ops.CONV1D, ops.BN1D, ops.CONV_RELU1D, ops.QAT_CONV1D, ops.QAT_CONV_RELU1D),
            (2, ops.CONV2D, ops.BN2D, ops.CONV_RELU2D, ops.QAT_CONV2D, ops.QAT_CONV_RELU2D),
            (3, ops.CONV3D, ops.BN3D, ops.CONV_RELU3D, ops.QAT_CONV3D, ops.QAT_CONV_RELU3D)):
        limits = {2: c2, 3: conv3d_limits or weighted_limits}.get(n, weighted_limits)
        entries.append(_weighted(f"conv{n}d", conv, ((conv,), (conv, bn)), fused.fuse_conv_bn, f"conv{n}d",
                                 weight, limits, f"Conv{n}d, batch norm folded in",
                                 qat_fuser=qat.fuse_conv_bn_qat, qat_op=qat_conv))
        entries.append(_weighted(f"conv{n}d_relu", conv_relu, ((conv, bn, ops.RELU), (conv, ops.RELU)),
                                 fused.fuse_conv_bn_relu, f"conv{n}d_relu", weight, limits,
                                 f"Conv{n}d + ReLU (batch norm folded in)",
                                 qat_fuser=qat.fuse_conv_bn_relu_qat, qat_op=qat_conv_relu))
    entries.extend(_transposed_entries(weight, weighted_limits))
    entries.append(_weighted("linear", ops.LINEAR, ((ops.LINEAR,), (ops.LINEAR, ops.BN1D)), fused.fuse_linear_bn,
                             "linear", weight, weighted_limits, "Linear, batch norm 1d folded in",
                             qat_fuser=qat.fuse_linear_bn_qat, qat_op=ops.QAT_LINEAR))
    entries.append(_weighted("linear_relu", ops.LINEAR_RELU, ((ops.LINEAR, ops.BN1D, ops.RELU), (ops.LINEAR, ops.RELU)),
                             fused.fuse_linear_relu, "linear_relu", weight, weighted_limits, "Linear + ReLU",
                             qat_fuser=qat.fuse_linear_relu_qat, qat_op=ops.QAT_LINEAR_RELU))
    for n, bn, bn_relu in ((2, ops.BN2D, ops.BN_RELU2D), (3, ops.BN3D, ops.BN_RELU3D)):
        entries.append(OpEntry(f"batch_norm{n}d", bn, Observation.OWN, (_U8,), ((bn,),), lowering=f"batch_norm{n}d",
                               quantized_args=(0,), doc=f"BatchNorm{n}d not preceded by a conv"))
        entries.append(OpEntry(f"batch_norm{n}d_relu", bn_relu, Observation.OWN, (_U8,), ((bn, ops.RELU),),
                               fuser=fused.fuse_bn_relu, qat_fuser=fused.fuse_bn_relu,
                               lowering=f"batch_norm{n}d_relu", quantized_args=(0,),
                               doc=f"BatchNorm{n}d + ReLU"))
    for name, kind, fused_kind in (("add", ops.ADD, ops.ADD_RELU), ("mul", ops.MUL, ops.MUL_RELU)):
        fixed = (("alpha", 1, "a + b"),) if name == "add" else ()  # torch.add(a, b, alpha=k): the kernel has none
        entries.append(OpEntry(name, kind, Observation.OWN, (_U8,), ((kind,),), constraints=binary_limits,
                               lowering=name, quantized_args=(0, 1), fixed_args=fixed,
                               doc=f"tensor {name} (a scalar operand too)"))
        entries.append(OpEntry(f"{name}_relu", fused_kind, Observation.OWN, (_U8,), ((kind, ops.RELU),),
                               constraints=binary_limits, lowering=f"{name}_relu", quantized_args=(0, 1),
                               fixed_args=fixed, doc=f"{name} + ReLU"))
    entries.append(OpEntry("cat", ops.CAT, Observation.OWN, (_U8,), ((ops.CAT,),), lowering="cat",
                           quantized_args=(0,), op_args=(("dim", 1, 0),), inputs_take_output_grid=True,
                           doc="concatenation to one output grid: an input that only the cat reads is written in "
                               "that grid by its producer (the cat copies it), any other is requantized"))
    entries.append(OpEntry("stack", ops.STACK, Observation.OWN, (_U8,), ((ops.STACK,),), lowering="stack",
                           quantized_args=(0,), op_args=(("dim", 1, 0),), doc="stack, requantized to one scale"))
    entries.append(OpEntry("matmul", ops.MATMUL, Observation.OWN, (_U8,), ((ops.MATMUL,),), lowering="matmul",
                           quantized_args=(0, 1), doc="matmul / bmm of two activations (attention scores)"))
    entries.extend(_norm_and_activation_entries())
    entries.append(OpEntry("hardswish", ops.HARDSWISH, Observation.OWN, (_U8,), ((ops.HARDSWISH,),),
                           lowering="hardswish", quantized_args=(0,), doc="hardswish"))
    # softmax gets its own calibrated observer, not the fixed [0, 1] grid: attention probabilities over ~200
    # tokens sit near 1/200, below one 1/256 step (vit_b_16: 14.9 dB with the fixed grid, 26+ dB observed)
    entries.append(OpEntry("softmax", ops.SOFTMAX, Observation.OWN, (_U8,), ((ops.SOFTMAX,),), lowering="softmax",
                           quantized_args=(0,), op_args=(("dim", 1, None),),
                           doc="softmax along dim, calibrated output range"))
    for kind in (ops.SIGMOID, ops.HARDSIGMOID, ops.TANH):
        entries.append(OpEntry(kind.name, kind, Observation.FIXED, (_U8,), ((kind,),),
                               constraints=Constraints(fixed_qparams=FIXED_QPARAMS[kind.name]), quantized_args=(0,),
                               doc=f"{kind.name}, fixed output range"))
    if gelu_own_grid:
        entries.append(OpEntry("gelu", ops.GELU, Observation.OWN, (_U8,), ((ops.GELU,),), lowering="gelu",
                               quantized_args=(0,), op_args=(("approximate", 1, "none"),),
                               doc="GELU with its own output grid (computed in float between the kernel's "
                                   "dequantize and quantize: no int8 GELU kernel)"))
    for kind in SHARES_INPUT_KINDS:
        if gelu_own_grid and kind is ops.GELU:
            continue
        entries.append(OpEntry(kind.name, kind, Observation.SHARES_INPUT, (_U8,), ((kind,),), quantized_args=(0,),
                               leaves_grid=kind in LEAVES_GRID_KINDS,
                               doc=f"{kind.name} on the quantized tensor, same qparams as its input"))
    entries.append(OpEntry("size", ops.SIZE, Observation.NONE, (_U8,), ((ops.SIZE,),), quantized_args=(0,),
                           doc="shape queries: no quantized output"))
    return tuple(entries)


# ------------------------------------------------------------------------------- dynamic and weight-only
_FLOAT = torch.float32
_DYNAMIC_U8 = DTypeConfig(input=torch.quint8, output=_FLOAT, weight=torch.qint8, bias=_FLOAT, dynamic=True,
                          input_qscheme=torch.per_tensor_affine)
_PER_TOKEN_U8 = DTypeConfig(input=torch.quint8, output=_FLOAT, weight=torch.qint8, bias=_FLOAT, dynamic=True,
                            input_qscheme=torch.per_channel_affine)
_DYNAMIC_FP16 = DTypeConfig(input=torch.float16, output=_FLOAT, weight=torch.float16, bias=_FLOAT, dynamic=True)
_FP16_WEIGHT = WeightRule(dtype=torch.float16, qschemes=(torch.per_tensor_affine,))
#: the per-token kernel takes weights without zero points: symmetric only
_SYMMETRIC_S8 = WeightRule(dtype=torch.qint8, qschemes=(torch.per_channel_symmetric, torch.per_tensor_symmetric))


def _dynamic(name: str, op: OpKind, dtypes: DTypeConfig, weight: WeightRule, limits: Constraints, doc: str,
             lowering: Optional[str] = None) -> OpEntry:
    return OpEntry(name=name, op=op, observation=Observation.NONE, dtypes=(dtypes,), patterns=((op,),), weight=weight,
                   constraints=limits, lowering=lowering or name, doc=doc)


def dynamic_entries(weight: WeightRule, limits: Constraints, fp16: bool = True) -> tuple[OpEntry, ...]:
    """Dynamic and weight-only entries: weights quantized ahead of time, activations at run time (or not at
    all), output float. Chosen only for dynamic / weight-only qconfigs (``DTypeConfig.dynamic``).

    Args:
        weight: the weight rule of the backend's int8 linear kernels (also used by the recurrent layers).
        limits: their constraints (qnnpack's weight range).
        fp16: whether the backend has float16-weight linear kernels (fbgemm does, qnnpack does not).

    Returns:
        The entries, in table order (for one op, the first whose dtypes accept the qconfig is chosen).
    """
    entries = [
        _dynamic("linear_dynamic", ops.LINEAR, _DYNAMIC_U8, weight, limits,
                 "Linear: int8 weights, activations quantized per tensor at run time"),
        _dynamic("linear_relu_dynamic", ops.LINEAR_RELU, _DYNAMIC_U8, weight, limits, "Linear + ReLU, dynamic int8"),
        _dynamic("linear_per_token", ops.LINEAR, _PER_TOKEN_U8, _SYMMETRIC_S8, Constraints(),
                 "Linear: int8 weights, uint8 activations with one scale and offset per row (token) at run "
                 "time; oneDNN / torch._int_mm on plain int8 tensors"),
        _dynamic("linear_relu_per_token", ops.LINEAR_RELU, _PER_TOKEN_U8, _SYMMETRIC_S8, Constraints(),
                 "Linear + ReLU, per-token dynamic int8"),
    ]
    if fp16:
        entries += [_dynamic("linear_dynamic_fp16", ops.LINEAR, _DYNAMIC_FP16, _FP16_WEIGHT, Constraints(),
                             "Linear with float16 weights"),
                    _dynamic("linear_relu_dynamic_fp16", ops.LINEAR_RELU, _DYNAMIC_FP16, _FP16_WEIGHT, Constraints(),
                             "Linear + ReLU with float16 weights"),
                    _dynamic("lstm_dynamic_fp16", ops.LSTM, _DYNAMIC_FP16, _FP16_WEIGHT, Constraints(),
                             "LSTM with float16 weights"),
                    _dynamic("gru_dynamic_fp16", ops.GRU, _DYNAMIC_FP16, _FP16_WEIGHT, Constraints(),
                             "GRU with float16 weights")]
    for name, kind, what in (("lstm_dynamic", ops.LSTM, "LSTM"), ("gru_dynamic", ops.GRU, "GRU"),
                             ("lstm_cell_dynamic", ops.LSTM_CELL, "LSTMCell"),
                             ("gru_cell_dynamic", ops.GRU_CELL, "GRUCell"),
                             ("rnn_cell_dynamic", ops.RNN_CELL, "RNNCell (tanh or relu)")):
        entries.append(_dynamic(name, kind, _DYNAMIC_U8, weight, limits,
                                f"{what}: int8 weights, activations quantized per tensor at run time"))
    for bits, dtype in ((8, torch.quint8), (4, torch.quint4x2)):
        rowwise = WeightRule(dtype=dtype, qschemes=(torch.per_channel_affine_float_qparams,))
        only = DTypeConfig(input=_FLOAT, output=_FLOAT, weight=dtype, dynamic=True)
        entries += [_dynamic(f"embedding_{bits}bit", ops.EMBEDDING, only, rowwise, Constraints(),
                             f"Embedding: {bits}-bit row-wise weights (float scale and offset per row)"),
                    _dynamic(f"embedding_bag_{bits}bit", ops.EMBEDDING_BAG, only, rowwise, Constraints(),
                             f"EmbeddingBag (sum, mean): {bits}-bit row-wise weights")]
    return tuple(entries)
