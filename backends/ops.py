"""The op vocabulary backend tables are written in: each :class:`OpKind` lists every spelling of one op.

Module, functional, method and in-place forms that compute the same thing are one kind, so a table entry
written once matches ``nn.ReLU()``, ``F.relu(x)``, ``torch.relu(x)``, ``x.relu()`` and ``x.relu_()``.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant import fused, qat
from fxquant.backends.config import OpKind

__all__ = [
    "CONV1D", "CONV2D", "CONV3D", "LINEAR", "BN1D", "BN2D", "BN3D", "RELU", "RELU6", "HARDTANH",
    "ADD", "MUL", "CAT", "HARDSWISH", "SIGMOID", "TANH", "HARDSIGMOID", "MAXPOOL", "AVGPOOL",
    "ADAPTIVE_AVGPOOL", "FLATTEN", "RESHAPE", "PERMUTE", "TRANSPOSE", "CONTIGUOUS", "DROPOUT",
    "IDENTITY", "CHUNK", "GETITEM", "MEAN", "SIZE", "CONV_RELU1D", "CONV_RELU2D", "CONV_RELU3D",
    "LINEAR_RELU", "BN_RELU2D", "BN_RELU3D", "ADD_RELU", "MUL_RELU", "CLAMP", "SQUEEZE", "UNSQUEEZE",
    "CHANNEL_SHUFFLE", "INTERPOLATE", "CONV_TRANSPOSE1D", "CONV_TRANSPOSE2D", "CONV_TRANSPOSE3D", "LAYER_NORM",
    "GROUP_NORM", "INSTANCE_NORM", "ELU", "LEAKY_RELU", "PRELU", "GELU", "SOFTMAX", "MATMUL", "STACK", "SPLIT",
    "PIXEL_SHUFFLE", "PIXEL_UNSHUFFLE", "PAD", "EXPAND", "REPEAT", "QAT_CONV1D", "QAT_CONV2D", "QAT_CONV3D",
    "QAT_CONV_RELU1D", "QAT_CONV_RELU2D", "QAT_CONV_RELU3D", "QAT_LINEAR", "QAT_LINEAR_RELU", "clamp_bounds",
]

CONV1D = OpKind("conv1d", modules=(nn.Conv1d,))
CONV2D = OpKind("conv2d", modules=(nn.Conv2d,))
CONV3D = OpKind("conv3d", modules=(nn.Conv3d,))
LINEAR = OpKind("linear", modules=(nn.Linear,))
BN1D = OpKind("batch_norm1d", modules=(nn.BatchNorm1d,))
BN2D = OpKind("batch_norm2d", modules=(nn.BatchNorm2d,))
BN3D = OpKind("batch_norm3d", modules=(nn.BatchNorm3d,))
RELU = OpKind("relu", modules=(nn.ReLU,), functions=(F.relu, torch.relu, torch.relu_),
              methods=("relu", "relu_"))
RELU6 = OpKind("relu6", modules=(nn.ReLU6,), functions=(F.relu6,))
HARDTANH = OpKind("hardtanh", modules=(nn.Hardtanh,), functions=(F.hardtanh, F.hardtanh_))
CLAMP = OpKind("clamp", functions=(torch.clamp, torch.clip), methods=("clamp", "clip"))
ADD = OpKind("add", functions=(operator.add, operator.iadd, torch.add), methods=("add", "add_"))
MUL = OpKind("mul", functions=(operator.mul, operator.imul, torch.mul), methods=("mul", "mul_"))
CAT = OpKind("cat", functions=(torch.cat, torch.concat))
HARDSWISH = OpKind("hardswish", modules=(nn.Hardswish,), functions=(F.hardswish,))
SIGMOID = OpKind("sigmoid", modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid),
                 methods=("sigmoid", "sigmoid_"))
HARDSIGMOID = OpKind("hardsigmoid", modules=(nn.Hardsigmoid,), functions=(F.hardsigmoid,))
TANH = OpKind("tanh", modules=(nn.Tanh,), functions=(torch.tanh, F.tanh), methods=("tanh", "tanh_"))
MAXPOOL = OpKind("max_pool", modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d),
                 functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d))
AVGPOOL = OpKind("avg_pool", modules=(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
                 functions=(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d))
ADAPTIVE_AVGPOOL = OpKind("adaptive_avg_pool",
                          modules=(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
                          functions=(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d))
FLATTEN = OpKind("flatten", modules=(nn.Flatten,), functions=(torch.flatten,), methods=("flatten",))
RESHAPE = OpKind("reshape", functions=(torch.reshape,), methods=("reshape", "view"))
PERMUTE = OpKind("permute", functions=(torch.permute,), methods=("permute",))
TRANSPOSE = OpKind("transpose", functions=(torch.transpose,), methods=("transpose",))
CONTIGUOUS = OpKind("contiguous", methods=("contiguous",))
SQUEEZE = OpKind("squeeze", functions=(torch.squeeze,), methods=("squeeze",))
UNSQUEEZE = OpKind("unsqueeze", functions=(torch.unsqueeze,), methods=("unsqueeze",))
CHUNK = OpKind("chunk", functions=(torch.chunk,), methods=("chunk",))
GETITEM = OpKind("getitem", functions=(operator.getitem,))
MEAN = OpKind("mean", functions=(torch.mean,), methods=("mean",))
DROPOUT = OpKind("dropout", modules=(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
                 functions=(F.dropout,))
IDENTITY = OpKind("identity", modules=(nn.Identity,))
CHANNEL_SHUFFLE = OpKind("channel_shuffle", modules=(nn.ChannelShuffle,),
                         functions=(torch.channel_shuffle, F.channel_shuffle))
INTERPOLATE = OpKind("interpolate", modules=(nn.Upsample, nn.UpsamplingNearest2d),
                     functions=(F.interpolate,))
SIZE = OpKind("size", methods=("size", "dim"), functions=(getattr,))

CONV_TRANSPOSE1D = OpKind("conv_transpose1d", modules=(nn.ConvTranspose1d,))
CONV_TRANSPOSE2D = OpKind("conv_transpose2d", modules=(nn.ConvTranspose2d,))
CONV_TRANSPOSE3D = OpKind("conv_transpose3d", modules=(nn.ConvTranspose3d,))
LAYER_NORM = OpKind("layer_norm", modules=(nn.LayerNorm,))
GROUP_NORM = OpKind("group_norm", modules=(nn.GroupNorm,))
INSTANCE_NORM = OpKind("instance_norm", modules=(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d))
ELU = OpKind("elu", modules=(nn.ELU,), functions=(F.elu,))
LEAKY_RELU = OpKind("leaky_relu", modules=(nn.LeakyReLU,), functions=(F.leaky_relu,))
PRELU = OpKind("prelu", modules=(nn.PReLU,))
GELU = OpKind("gelu", modules=(nn.GELU,), functions=(F.gelu,))
SOFTMAX = OpKind("softmax", modules=(nn.Softmax,), functions=(F.softmax, torch.softmax), methods=("softmax",))
MATMUL = OpKind("matmul", functions=(torch.matmul, torch.bmm, operator.matmul), methods=("matmul", "bmm"))
STACK = OpKind("stack", functions=(torch.stack,))
SPLIT = OpKind("split", functions=(torch.split,), methods=("split",))
PIXEL_SHUFFLE = OpKind("pixel_shuffle", modules=(nn.PixelShuffle,), functions=(F.pixel_shuffle,))
PIXEL_UNSHUFFLE = OpKind("pixel_unshuffle", modules=(nn.PixelUnshuffle,), functions=(F.pixel_unshuffle,))
PAD = OpKind("pad", functions=(F.pad,))
EXPAND = OpKind("expand", methods=("expand", "expand_as"))
REPEAT = OpKind("repeat", methods=("repeat",))

# post-fusion kinds
CONV_RELU1D = OpKind("conv_relu1d", modules=(fused.ConvReLU1d,))
CONV_RELU2D = OpKind("conv_relu2d", modules=(fused.ConvReLU2d,))
CONV_RELU3D = OpKind("conv_relu3d", modules=(fused.ConvReLU3d,))
LINEAR_RELU = OpKind("linear_relu", modules=(fused.LinearReLU,))
BN_RELU2D = OpKind("bn_relu2d", modules=(fused.BNReLU2d,))
BN_RELU3D = OpKind("bn_relu3d", modules=(fused.BNReLU3d,))
ADD_RELU = OpKind("add_relu", functions=(fused.add_relu,))
MUL_RELU = OpKind("mul_relu", functions=(fused.mul_relu,))

# kinds after QAT fusion (prepare_qat_fx); convert_fx turns each back into the post-fusion kind above
QAT_CONV1D = OpKind("qat_conv1d", modules=(qat.Conv1d, qat.ConvBn1d))
QAT_CONV2D = OpKind("qat_conv2d", modules=(qat.Conv2d, qat.ConvBn2d))
QAT_CONV3D = OpKind("qat_conv3d", modules=(qat.Conv3d, qat.ConvBn3d))
QAT_CONV_RELU1D = OpKind("qat_conv_relu1d", modules=(qat.ConvReLU1d, qat.ConvBnReLU1d))
QAT_CONV_RELU2D = OpKind("qat_conv_relu2d", modules=(qat.ConvReLU2d, qat.ConvBnReLU2d))
QAT_CONV_RELU3D = OpKind("qat_conv_relu3d", modules=(qat.ConvReLU3d, qat.ConvBnReLU3d))
QAT_LINEAR = OpKind("qat_linear", modules=(qat.Linear, qat.LinearBn1d))
QAT_LINEAR_RELU = OpKind("qat_linear_relu", modules=(qat.LinearReLU, qat.LinearBnReLU1d))

# recurrent layers and embedding tables (dynamic and weight-only quantization; traced as leaf modules)
LSTM = OpKind("lstm", modules=(nn.LSTM,))
GRU = OpKind("gru", modules=(nn.GRU,))
LSTM_CELL = OpKind("lstm_cell", modules=(nn.LSTMCell,))
GRU_CELL = OpKind("gru_cell", modules=(nn.GRUCell,))
RNN_CELL = OpKind("rnn_cell", modules=(nn.RNNCell,))
EMBEDDING = OpKind("embedding", modules=(nn.Embedding,))
EMBEDDING_BAG = OpKind("embedding_bag", modules=(nn.EmbeddingBag,))

__all__ += ["LSTM", "GRU", "LSTM_CELL", "GRU_CELL", "RNN_CELL", "EMBEDDING", "EMBEDDING_BAG"]


#: the bound arguments of the clamp kinds' functional and method forms, in positional order (the module forms
#: keep them as attributes of the same names, nn.ReLU6 as 0 and 6)
_BOUND_ARGS = {"hardtanh": ("min_val", "max_val", -1.0, 1.0), "clamp": ("min", "max", None, None)}


def clamp_bounds(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[tuple[float, float]]:
    """The constant ``(low, high)`` that a clamp-like node (relu, relu6, hardtanh, clamp) limits its input to.

    ``None`` for any other node, and for bounds computed at run time (a tensor or a node). A missing side of a
    ``clamp`` is infinite.

    Example:
        >>> import torch.fx as fx, torch.nn.functional as F
        >>> gm = fx.symbolic_trace(lambda x: F.hardtanh(x.clamp(min=-2.0), 0.0, 4.0))
        >>> [clamp_bounds(n, {}) for n in gm.graph.nodes if n.op != "placeholder" and n.op != "output"]
        [(-2.0, inf), (0.0, 4.0)]
    """
    if RELU.matches(node, modules):
        return (0.0, math.inf)
    if RELU6.matches(node, modules):
        return (0.0, 6.0)
    for kind in (HARDTANH, CLAMP):
        if not kind.matches(node, modules):
            continue
        lo_name, hi_name, lo_default, hi_default = _BOUND_ARGS[kind.name]
        if node.op == "call_module":
            module = modules[str(node.target)]
            lo, hi = getattr(module, lo_name), getattr(module, hi_name)
        else:
            pos = node.args[1:3]
            lo = node.kwargs.get(lo_name, pos[0] if len(pos) > 0 else lo_default)
            hi = node.kwargs.get(hi_name, pos[1] if len(pos) > 1 else hi_default)
        return _constant_bounds(lo, hi)
    return None


def _constant_bounds(lo: Any, hi: Any) -> Optional[tuple[float, float]]:
    if lo is None and hi is None:
        return None
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in (lo, hi)):
        return None  # a tensor or a value computed at run time
    return (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))
