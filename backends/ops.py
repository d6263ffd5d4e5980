"""The op vocabulary backend tables are written in: each :class:`OpKind` lists every spelling of one op.

Module, functional, method and in-place forms that compute the same thing are one kind, so a table entry
written once matches ``nn.ReLU()``, ``F.relu(x)``, ``torch.relu(x)``, ``x.relu()`` and ``x.relu_()``.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from fxquant import fused
from fxquant.backends.config import OpKind

__all__ = [
    "CONV1D", "CONV2D", "CONV3D", "LINEAR", "BN1D", "BN2D", "BN3D", "RELU", "RELU6", "HARDTANH",
    "ADD", "MUL", "CAT", "HARDSWISH", "SIGMOID", "TANH", "HARDSIGMOID", "MAXPOOL", "AVGPOOL",
    "ADAPTIVE_AVGPOOL", "FLATTEN", "RESHAPE", "PERMUTE", "TRANSPOSE", "CONTIGUOUS", "DROPOUT",
    "IDENTITY", "CHUNK", "GETITEM", "MEAN", "SIZE", "CONV_RELU1D", "CONV_RELU2D", "CONV_RELU3D",
    "LINEAR_RELU", "BN_RELU2D", "BN_RELU3D", "ADD_RELU", "MUL_RELU", "CLAMP", "SQUEEZE", "UNSQUEEZE",
    "CHANNEL_SHUFFLE", "INTERPOLATE",
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

# post-fusion kinds
CONV_RELU1D = OpKind("conv_relu1d", modules=(fused.ConvReLU1d,))
CONV_RELU2D = OpKind("conv_relu2d", modules=(fused.ConvReLU2d,))
CONV_RELU3D = OpKind("conv_relu3d", modules=(fused.ConvReLU3d,))
LINEAR_RELU = OpKind("linear_relu", modules=(fused.LinearReLU,))
BN_RELU2D = OpKind("bn_relu2d", modules=(fused.BNReLU2d,))
BN_RELU3D = OpKind("bn_relu3d", modules=(fused.BNReLU3d,))
ADD_RELU = OpKind("add_relu", functions=(fused.add_relu,))
MUL_RELU = OpKind("mul_relu", functions=(fused.mul_relu,))
