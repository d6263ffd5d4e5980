"""The residual-stream pass: a stream of residual adds read by a LayerNorm stays float, also where layout ops
(MaxViT's window partition: reshape, permute) sit between the add and the LayerNorm."""

import pytest
import torch
from torch import nn

import fxquant
from fxquant.report import float_ops

STREAM = "residual stream read by LayerNorm"


class PartitionedBlock(nn.Module):
    """conv -> residual add -> window partition (reshape, permute, reshape) -> LayerNorm -> linear (+ residual),
    the shape of a MaxViT block's MBConv followed by its window attention; ``partition=False`` reads the
    add's result with a plain channels-last permute, ``residual=False`` has no add in front of the LayerNorm."""

    def __init__(self, partition: bool = True, residual: bool = True, c: int = 8) -> None:
        super().__init__()
        self.partition, self.residual = partition, residual
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        s = x + y if self.residual else y
        b, c, h, w = s.shape
        if self.partition:   # (b, c, h, w) -> windows of 2x2: (b, h/2 * w/2, 4, c)
            t = s.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w // 4, 4, c)
        else:
            t = s.permute(0, 2, 3, 1)
        return t + self.proj(self.norm(t))


def _float_ops(model: nn.Module) -> dict[str, str]:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    prepared = fxquant.prepare_fx(model.eval(), fxquant.get_default_qconfig_mapping("fbgemm"), (x,),
                                  backend_config="fbgemm")
    fxquant.calibrate(prepared, [torch.randn(2, 8, 4, 4) for _ in range(2)], progress=False)
    quantized = fxquant.convert_fx(prepared)
    assert torch.isfinite(quantized(x)).all()
    return {f.node: f.reason for f in float_ops(quantized)}


@pytest.mark.parametrize("partition", [True, False])
def test_a_stream_read_by_layer_norm_through_layout_ops_stays_float(partition: bool) -> None:
    floats = _float_ops(PartitionedBlock(partition=partition))
    assert STREAM in floats["add"] and STREAM in floats["norm"]   # the add in front, through the reshapes
    assert "conv" not in floats and "proj" not in floats         # the layers stay int8


def test_a_layer_norm_behind_layout_ops_of_a_layer_output_stays_int8() -> None:
    floats = _float_ops(PartitionedBlock(residual=False))
    assert "norm" not in floats and not any(STREAM in reason for reason in floats.values())


class PostNorm(nn.Module):
    """Two post-norm blocks, ``x + norm(linear(x))``, Swin V2's form: no LayerNorm reads the stream."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.fc1, self.fc2 = nn.Linear(c, c), nn.Linear(c, c)
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).permute(0, 2, 3, 1)
        t = t + self.norm1(self.fc1(t))
        return t + self.norm2(self.fc2(t))


class ConvResidual(nn.Module):
    """A ResNet-style residual add (no LayerNorm anywhere): stays int8."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return self.conv2(y + torch.relu(y))


def test_a_post_norm_stream_stays_float_and_its_layer_norms_int8() -> None:
    floats = _float_ops(PostNorm())
    assert STREAM in floats["add"] and STREAM in floats["add_1"]
    assert not any(name.startswith(("norm", "fc", "conv")) for name in floats)


def test_a_residual_add_without_layer_norm_stays_int8() -> None:
    assert "add" not in _float_ops(ConvResidual())
