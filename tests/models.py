"""Shared helpers of the PTQ tests: tiny models, a torchvision model builder, a quantize-in-one-call helper.

Imported by the test files as ``models`` (pytest puts ``tests/`` on ``sys.path``; there is no package).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxquant
from fxquant.observers import ObserverBase
from fxquant.qconfig import default_qconfig

__all__ = [
    "ConvBNReLU", "ConvBN", "Residual", "SmallCNN", "LinearHead", "DepthwiseBlock", "SingleConv", "SingleLinear",
    "ConvChain", "TWO_BIT",
    "seeded", "torchvision_model", "quantize", "observer_nodes", "node_kinds", "restore_engine", "ao_quantize",
    "codes_held", "sums_pairs_in_int16", "int16_pairs_can_overflow", "activation_range", "int16_safe_weight",
]


# ------------------------------------------------------------------------------------------- tiny models

class ConvBNReLU(nn.Module):
    """conv -> bn -> relu, with the relu spelled in any of the forms the fuse pass must recognise."""

    FORMS = ("module", "inplace_module", "F.relu", "F.relu_inplace", "torch.relu", "torch.relu_", "method",
             "method_")

    def __init__(self, form: str = "module", dims: int = 2, bn: bool = True, cin: int = 3, cout: int = 4) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.form = form
        self.conv = conv(cin, cout, 3, padding=1)
        self.bn = norm(cout) if bn else nn.Identity()
        self.relu = nn.ReLU(inplace=form == "inplace_module")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        form = self.form
        if form in ("module", "inplace_module"):
            return self.relu(y)
        if form == "F.relu":
            return F.relu(y)
        if form == "F.relu_inplace":
            return F.relu(y, inplace=True)
        if form == "torch.relu":
            return torch.relu(y)
        if form == "torch.relu_":
            return torch.relu_(y)
        if form == "method":
            return y.relu()
        if form == "method_":
            return y.relu_()
        raise ValueError(form)


class ConvBN(nn.Module):
    """conv -> bn (no relu)."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        self.conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](3, 4, 3, padding=1)
        self.bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Residual(nn.Module):
    """relu(conv(x) + conv2(relu(conv(x)))) with the final relu in a chosen form: add + relu fusion."""

    def __init__(self, form: str = "module") -> None:
        super().__init__()
        self.form = form
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        b = self.conv2(torch.relu(a))
        s = a + b
        if self.form == "module":
            return self.relu(s)
        if self.form == "F.relu":
            return F.relu(s)
        if self.form == "method_":
            return s.relu_()
        return torch.relu(s)


class SmallCNN(nn.Module):
    """A little of everything a CNN has: conv-bn-relu, maxpool, residual add, flatten, linear-relu, linear."""

    def __init__(self, channels: int = 8, image: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc1 = nn.Linear(channels * (image // 2) ** 2, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.relu1(self.bn1(self.conv1(x))))
        y = F.relu(y + self.bn2(self.conv2(y)))
        y = torch.flatten(y, 1)
        return self.fc2(F.relu(self.fc1(y)))


class LinearHead(nn.Module):
    """linear -> bn1d (-> relu)."""

    def __init__(self, relu: bool = True, bn: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5) if bn else nn.Identity()
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.fc(x)))


class DepthwiseBlock(nn.Module):
    """pointwise conv -> depthwise conv with ``channels`` channels -> relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, channels, 1)
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.dw(self.pw(x)))


class SingleConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SingleLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ConvChain(nn.Module):
    """Four 3x3 convs (3 -> 8 -> 8 -> 8 -> 4) with ReLUs between: the debugging tools' test model, whose
    ``convs.1`` gets :data:`TWO_BIT` weights to lose accuracy on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in
                                   ((3, 8), (8, 8), (8, 8), (8, 4)))

    def forward(self, x):
        for conv in self.convs[:-1]:
            x = torch.relu(conv(x))
        return self.convs[-1](x)


#: 2-bit per-tensor weights (codes -2..1): a qconfig that makes its layer lose accuracy on purpose
TWO_BIT = default_qconfig.replace(weight=fxquant.MinMaxObserver.with_args(
    dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-2, quant_max=1))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise ``model`` deterministically, give its batch norms non-trivial statistics, eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


# ------------------------------------------------------------------------------------------- torchvision

def torchvision_model(name: str, seed: int = 0, image_size: int = 64, bn_batches: int = 8,
                      batch_size: int = 4) -> nn.Module:
    """A random-init torchvision model (seeded) whose BN statistics are re-estimated by ``bn_batches``
    train-mode forwards on random batches under ``no_grad``, returned in eval mode."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    with torch.no_grad():
        for _ in range(bn_batches):
            model(torch.randn(batch_size, 3, image_size, image_size, generator=gen))
    return model.eval()


# --------------------------------------------------------------------------------------------- pipelines

def quantize(model: nn.Module, example: torch.Tensor, backend: str = "fbgemm",
             calib: Optional[Sequence[Any]] = None, mapping: Any = None,
             prepare_custom_config: Any = None) -> tuple[fx.GraphModule, fx.GraphModule]:
    """prepare_fx + calibrate + convert_fx; returns ``(prepared, converted)``."""
    mapping = fxquant.get_default_qconfig_mapping(backend) if mapping is None else mapping
    prepared = fxquant.prepare_fx(model, mapping, (example,), prepare_custom_config, backend_config=backend)
    fxquant.calibrate(prepared, calib if calib is not None else [example], progress=False)
    return prepared, fxquant.convert_fx(prepared)


def ao_quantize(model: nn.Module, example: torch.Tensor, calib: Sequence[torch.Tensor], backend: str) -> nn.Module:
    """The same post-training quantization with torch.ao (the reference), under ``backend``'s engine."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        torch.backends.quantized.engine = backend
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(backend), (example,))
        with torch.no_grad():
            for batch in calib:
                prepared(batch)
        return convert_fx(prepared)


def observer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(modules.get(str(n.target)), ObserverBase)]


def node_kinds(gm: fx.GraphModule) -> list[str]:
    """Each call node as readable text: the module class name, the function name or ``.method``."""
    modules = dict(gm.named_modules())
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(type(modules[str(n.target)]).__name__)
        elif n.op == "call_function":
            out.append(getattr(n.target, "__name__", str(n.target)))
        elif n.op == "call_method":
            out.append(f".{n.target}")
    return out


@contextlib.contextmanager
def _keep_engine() -> Iterator[None]:
    old = torch.backends.quantized.engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


@pytest.fixture(autouse=True)
def restore_engine() -> Iterator[None]:
    """convert_fx selects its backend's quantized engine; put the previous one back after each test."""
    with _keep_engine():
        yield


# ------------------------------------------------------------------------------- what the int8 kernels hold and sum

def codes_held(qp: Any) -> Any:
    """``qp`` (a :class:`fxquant.qparams.QParams`) over every code its dtype holds. A grid narrower than its dtype
    (7-bit activations, ``reduce_range``: codes 0..127) only places the scale and zero point: torch's quantize and
    the quantized-tensor kernels clamp to the dtype (0..255), so values beyond the calibrated range land on the codes
    above the grid's end (passes/lower.py keeps a clamp after a 7-bit grid for that reason; oneDNN's modules clamp at
    the grid's top instead). On a full 8-bit grid: ``qp`` itself."""
    import dataclasses

    from fxquant.qparams import QUANTIZED_DTYPES

    _, lo, hi = QUANTIZED_DTYPES[qp.dtype]
    return dataclasses.replace(qp, quant_min=lo, quant_max=hi)


def sums_pairs_in_int16(backend: Any) -> bool:
    """Whether the conv / linear kernels of ``backend`` (a name or a BackendConfig) sum u8 x s8 products in pairs
    held in int16 on this CPU: fbgemm's or oneDNN's kernels without VNNI. The table then picks 7-bit activations (see
    backends/config.py), which keeps every pair inside int16 for codes up to 127, not for the codes above the grid's
    end that values beyond the calibrated range take (:func:`codes_held`)."""
    from fxquant.backends import get_backend_config
    from fxquant.backends.cpu import has_vnni

    cfg = get_backend_config(backend) if isinstance(backend, str) else backend
    return cfg.reduce_range_without_vnni and not has_vnni()


def int16_pairs_can_overflow(x_codes: torch.Tensor, weight_codes: torch.Tensor) -> bool:
    """Whether a pair ``a1 * w1 + a2 * w2`` of u8 activation codes ``x_codes`` and s8 weight codes can leave int16
    ([-32768, 32767]), bounded by twice the largest activation code times the largest weight magnitude."""
    a = int(x_codes.to(torch.int32).max())
    w = int(weight_codes.to(torch.int32).abs().max())
    return 2 * a * w > 32767


def activation_range(backend: str) -> tuple[int, int]:
    """The codes of ``backend``'s default activation grid on this CPU (0..127 for fbgemm without VNNI)."""
    from fxquant.backends import get_backend_config
    from fxquant.qparams import dtype_range

    spec = get_backend_config(backend).default_activation()
    return dtype_range(spec.dtype, spec.reduce_range, spec.quant_min, spec.quant_max)


def int16_safe_weight(weight: Any, backend: str) -> Any:
    """The weight observer factory ``weight`` on [-64, 63] where ``backend``'s table runs fbgemm's kernels (which sum
    u8 x s8 pairs in int16 without VNNI), so that no pair of 8-bit activation codes leaves int16 (2 * 255 * 64 =
    32640) and a test with full 8-bit activations means the same on every CPU; else ``weight`` itself."""
    from fxquant.backends import get_backend_config

    cfg = get_backend_config(backend)
    if cfg.kernels == "qtensor" and cfg.reduce_range_without_vnni:  # x86 on oneDNN (a VNNI CPU) needs none of it
        return weight.with_overrides(quant_min=-64, quant_max=63)
    return weight
