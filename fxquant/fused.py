"""Fused float modules and functions: what fusion produces and lowering consumes.

Fusion folds batch norm into the preceding conv/linear (eval mode) and groups an op with the ReLU that
follows it, so one graph node is one quantized kernel. These are ordinary float modules: a fused model
computes the same function as the original (up to float rounding of the BN fold).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from fxquant.fused import fold_bn
    >>> conv, bn = nn.Conv2d(3, 4, 3).eval(), nn.BatchNorm2d(4).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> torch.allclose(fold_bn(conv, bn)(x), bn(conv(x)), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, ClassVar, Optional

import torch
from torch import nn

__all__ = [
    "ConvReLU1d",
    "ConvReLU2d",
    "ConvReLU3d",
    "LinearReLU",
    "BNReLU2d",
    "BNReLU3d",
    "add_relu",
    "mul_relu",
    "FoldedConv1d",
    "FoldedConv2d",
    "FoldedConv3d",
    "FoldedConvTranspose1d",
    "FoldedConvTranspose2d",
    "FoldedConvTranspose3d",
    "FoldedLinear",
    "fold_bn",
    "fold_bn_on_read",
    "is_folded_on_read",
    "materialize_folds",
    "float_type",
    "fuse_conv_bn",
    "fuse_conv_bn_relu",
    "fuse_linear_bn",
    "fuse_linear_relu",
    "fuse_bn_relu",
]


class _OpReLU(nn.Module):
    """An op followed by ReLU, as one module (``self.op`` then ``relu``)."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.op(x))


class ConvReLU1d(_OpReLU):
    """``relu(conv1d(x))``."""


class ConvReLU2d(_OpReLU):
    """``relu(conv2d(x))``."""


class ConvReLU3d(_OpReLU):
    """``relu(conv3d(x))``."""


class LinearReLU(_OpReLU):
    """``relu(linear(x))``."""


class BNReLU2d(_OpReLU):
    """``relu(batch_norm2d(x))``."""


class BNReLU3d(_OpReLU):
    """``relu(batch_norm3d(x))``."""


def _traced_as_one_call(fn: Any, a: Any, b: Any) -> Optional[torch.fx.Proxy]:
    """Under any torch.fx tracer (torch.load re-traces a saved GraphModule's code), record ``fn(a, b)`` as one
    call_function node instead of tracing into it: the fused op must stay one node for its record to apply."""
    proxy = a if isinstance(a, torch.fx.Proxy) else b if isinstance(b, torch.fx.Proxy) else None
    return None if proxy is None else proxy.tracer.create_proxy("call_function", fn, (a, b), {})


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(a + b)``: the fused form of an add followed by a ReLU."""
    traced = _traced_as_one_call(add_relu, a, b)
    return torch.relu(a + b) if traced is None else traced


def mul_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(a * b)``: the fused form of a mul followed by a ReLU."""
    traced = _traced_as_one_call(mul_relu, a, b)
    return torch.relu(a * b) if traced is None else traced


def _copy(module: nn.Module) -> nn.Module:
    """A copy of a leaf module that shares its tensors (fusion replaces the ones it changes): cheaper than a
    deepcopy of every weight, which fusion of a whole model would otherwise pay."""
    out = copy.copy(module)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    out._modules = dict(module._modules)
    return out


#: the buffer of a conv that folds a batch norm on read (:class:`_FoldsBNOnRead`)
FOLD_BUFFER = "bn_fold"


def _bn_rows(bn: nn.Module) -> torch.Tensor:
    """``[scale; mean; beta]`` of an eval-mode batch norm, ``scale = gamma / sqrt(var + eps)``: what folding needs."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {type(bn).__name__} without running statistics "
                         "(track_running_stats=False); leave it unfused")
    with torch.no_grad():
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
        return torch.stack([gamma * torch.rsqrt(bn.running_var + bn.eps), bn.running_mean.detach(), beta])


def _channel_shape(op: nn.Module, dim: int) -> list[int]:
    """The shape that broadcasts a per-output-channel vector over ``op``'s weight (axis 1 of a transposed conv's)."""
    shape = [1] * dim
    shape[1 if isinstance(op, nn.modules.conv._ConvTransposeNd) else 0] = -1
    return shape


def _folded_weight(op: nn.Module, raw: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``raw * scale`` per output channel, ``rows`` being a ``bn_fold`` buffer ``[scale; mean; beta]``."""
    return raw * rows[0].reshape(_channel_shape(op, raw.dim()))


def _folded_bias(raw: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(raw - mean) * scale + beta``, ``rows`` being a ``bn_fold`` buffer ``[scale; mean; beta]``."""
    scale, mean, beta = rows
    return (raw - mean) * scale + beta


def fold_bn(op: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``op`` (conv or linear) with the eval-mode batch norm ``bn`` folded into it.

    ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
    """
    rows = _bn_rows(bn)
    fused = _copy(op)
    bias = op.bias if op.bias is not None else torch.zeros_like(rows[1])
    with torch.no_grad():
        fused.weight = nn.Parameter(_folded_weight(op, op.weight.detach(), rows))
        fused.bias = nn.Parameter(_folded_bias(bias.detach(), rows))
    return fused


def _fold_on_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                  missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    """A load_state_dict pre-hook of a materialized module (:meth:`_FoldsBNOnRead.materialize_fold`): a state
    dict saved before it materialized holds the unfolded weight and bias with their ``bn_fold`` rows; they are
    folded as a read would have, so the plain module gets what it computes with (not the raw weight, and no
    unexpected ``bn_fold`` key)."""
    rows = state_dict.pop(prefix + FOLD_BUFFER, None)
    if rows is None:
        return
    lacking = [prefix + name for name in ("weight", "bias") if prefix + name not in state_dict]
    if lacking:
        error_msgs.append(f"{prefix}{FOLD_BUFFER} (a batch norm's fold) came without {', '.join(lacking)}: the "
                          "fold needs the unfolded weight and bias it was saved with")
        return
    weight, bias = state_dict[prefix + "weight"], state_dict[prefix + "bias"]
    axis = _channel_shape(module, weight.dim()).index(-1)
    channels = rows.shape[-1] if rows.dim() else -1
    if tuple(rows.shape) != (3, channels) or weight.shape[axis] != channels or tuple(bias.shape) != (channels,):
        error_msgs.append(f"size mismatch for {prefix}{FOLD_BUFFER}: {tuple(rows.shape)} from the checkpoint does not "
                          f"fold a weight of shape {tuple(weight.shape)} and a bias of shape {tuple(bias.shape)}")
        return
    with torch.no_grad():
        state_dict[prefix + "weight"] = _folded_weight(module, weight, rows)
        state_dict[prefix + "bias"] = _folded_bias(bias, rows)


class _FoldsBNOnRead:
    """A conv or linear with an eval-mode batch norm folded into it when its ``weight`` or ``bias`` is read.

    It keeps the float model's own weight and bias (``_parameters``, which ``state_dict`` and
    ``named_parameters`` list) and one buffer ``bn_fold`` of the batch norm's per-channel ``scale`` =
    ``gamma / sqrt(var + eps)``, ``mean`` and ``beta`` (its rows, one tensor: a prepared CNN has thousands).
    Reading ``weight`` returns ``w * scale`` and reading ``bias`` ``(b - mean) * scale + beta``, new tensors each
    time (the same values as
    :func:`fold_bn`), so a prepared model holds no second copy of its conv weights: the fold is computed when a
    forward, an observer or lowering reads it, and dropped after.

    Assigning ``weight`` or ``bias`` (equalization, bias correction, a user) first turns the module into its
    plain float class with the folded tensors as its own parameters (:meth:`materialize_fold`); so does running
    a prepared model in train mode. Under ``torch.no_grad`` (calibration, lowering, code that edits weights)
    a read returns an inference tensor (made under ``torch.inference_mode``): writing into it in place, which
    would change nothing, raises instead, so code that changes weights assigns them (as fxquant's passes do).
    With gradients enabled a read is an ordinary tensor computed from the float weight, so autograd can save it
    and pass gradients through it. A conv without bias gets a zero bias parameter, so the folded bias always
    has a parameter to live in.
    """

    _float_type: ClassVar[type]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        raw, rows = self._parameters["weight"], self._buffers[FOLD_BUFFER]  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # autograd may save it (an input gradient) or pass gradients to ``raw``
            return _folded_weight(self, raw, rows)  # type: ignore[arg-type]
        with torch.inference_mode():
            return _folded_weight(self, raw.detach(), rows)  # type: ignore[arg-type]

    @property
    def bias(self) -> torch.Tensor:  # type: ignore[override]
        raw, rows = self._parameters["bias"], self._buffers[FOLD_BUFFER]  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            return _folded_bias(raw, rows)
        with torch.inference_mode():
            return _folded_bias(raw.detach(), rows)

    def materialize_fold(self, own_parameters: bool = False) -> None:
        """Become the plain float class holding the folded weight and bias, in the same ``Parameter`` objects
        (an optimizer built on the prepared model keeps training them), or in new ones with
        ``own_parameters=True`` (for a weight tied to another module, which must keep its value)."""
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = self.weight.clone(), self.bias.clone()  # clones: normal tensors, not inference tensors
        raw_weight, raw_bias = self._parameters["weight"], self._parameters["bias"]  # type: ignore[attr-defined]
        del self._buffers[FOLD_BUFFER]  # type: ignore[attr-defined]
        self.__class__ = self._float_type
        self.register_load_state_dict_pre_hook(_fold_on_load)  # type: ignore[attr-defined]
        if own_parameters:
            self._parameters["weight"] = nn.Parameter(weight, requires_grad=raw_weight.requires_grad)  # type: ignore[attr-defined]
            self._parameters["bias"] = nn.Parameter(bias, requires_grad=raw_bias.requires_grad)  # type: ignore[attr-defined]
        else:  # new memory: the float model's own tensors are not written
            raw_weight.data, raw_bias.data = weight, bias

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("weight", "bias") and not self.__dict__.get("_loading_fold"):
            self.materialize_fold()
        nn.Module.__setattr__(self, name, value)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A state dict without ``bn_fold`` holds folded weights (a materialized module's, see
        :meth:`materialize_fold`): become plain first, then load them. With ``bn_fold`` it holds the unfolded
        weights: load them as they are (``load_state_dict(assign=True)`` assigns, which must not materialize)."""
        if prefix + FOLD_BUFFER not in state_dict and prefix + "weight" in state_dict:
            self.materialize_fold()
            nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)
            return
        self.__dict__["_loading_fold"] = True
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        finally:
            del self.__dict__["_loading_fold"]

    def extra_repr(self) -> str:
        return super().extra_repr() + ", batch norm folded on read"  # type: ignore[misc]


def _folded_class(float_class: type) -> type:
    """``Folded<Class>``: ``float_class`` with a batch norm folded on read (see :class:`_FoldsBNOnRead`)."""
    name = f"Folded{float_class.__name__}"
    return type(name, (_FoldsBNOnRead, float_class), {
        "_float_type": float_class, "__module__": __name__, "__qualname__": name,
        "__doc__": f"``nn.{float_class.__name__}`` with a batch norm folded on read (see :class:`_FoldsBNOnRead`)."})


FoldedConv1d = _folded_class(nn.Conv1d)
FoldedConv2d = _folded_class(nn.Conv2d)
FoldedConv3d = _folded_class(nn.Conv3d)
FoldedConvTranspose1d = _folded_class(nn.ConvTranspose1d)
FoldedConvTranspose2d = _folded_class(nn.ConvTranspose2d)
FoldedConvTranspose3d = _folded_class(nn.ConvTranspose3d)
FoldedLinear = _folded_class(nn.Linear)
_FOLDED = {c._float_type: c for c in (FoldedConv1d, FoldedConv2d, FoldedConv3d, FoldedConvTranspose1d,
                                      FoldedConvTranspose2d, FoldedConvTranspose3d, FoldedLinear)}


def float_type(module: Any) -> type:
    """The float class ``module`` computes as: ``nn.Conv2d`` for a :class:`FoldedConv2d`, else its own type."""
    return getattr(type(module), "_float_type", type(module))


def is_folded_on_read(module: Any) -> bool:
    """Whether ``module`` folds a batch norm when its weight is read (:func:`fold_bn_on_read`)."""
    return isinstance(module, _FoldsBNOnRead)


def fold_bn_on_read(op: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``op`` (conv or linear) that computes :func:`fold_bn`'s weight and bias when they are read.

    It shares ``op``'s weight and bias (no copy of the weights; a prepared model reads the float model's) and keeps
    ``bn``'s per-channel scale, mean and shift; see :class:`_FoldsBNOnRead`. Other module types are folded eagerly.
    """
    folded_type = _FOLDED.get(type(op))
    if folded_type is None:
        return fold_bn(op, bn)
    rows = _bn_rows(bn)
    out = _copy(op)
    out._buffers[FOLD_BUFFER] = rows
    if op.bias is None:
        out._parameters["bias"] = nn.Parameter(torch.zeros_like(rows[0]), requires_grad=op.weight.requires_grad)
    out.__class__ = folded_type
    return out


def materialize_folds(model: nn.Module) -> None:
    """Turn every module of ``model`` that folds on read into its plain float class (see :class:`_FoldsBNOnRead`):
    before training, whose optimizer needs the folded weights as parameters."""
    for m in model.modules():
        if isinstance(m, _FoldsBNOnRead):
            m.materialize_fold()


def materialize_tied_folds(model: nn.Module) -> None:
    """Fold eagerly, into parameters of their own, the modules of ``model`` that fold on read a weight or bias
    another module also holds (tied weights): materializing one in place would change the other."""
    holders = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    for m in model.modules():
        if isinstance(m, _FoldsBNOnRead) and any(holders[id(p)] > 1 for p in m._parameters.values()):
            m.materialize_fold(own_parameters=True)


_CONV_RELU = {nn.Conv1d: ConvReLU1d, nn.Conv2d: ConvReLU2d, nn.Conv3d: ConvReLU3d}
_BN_RELU = {nn.BatchNorm2d: BNReLU2d, nn.BatchNorm3d: BNReLU3d}


def fuse_conv_bn(mods: list[Optional[nn.Module]]) -> nn.Module:
    """conv, bn -> conv with bn folded on read (:func:`fold_bn_on_read`)."""
    return fold_bn_on_read(mods[0], mods[1])


def fuse_conv_bn_relu(mods: list[Optional[nn.Module]]) -> nn.Module:
    """conv, bn, relu -> ConvReLUNd with bn folded on read (also accepts conv, relu)."""
    conv = fold_bn_on_read(mods[0], mods[1]) if len(mods) == 3 else _copy(mods[0])
    return _CONV_RELU[float_type(mods[0])](conv)


def fuse_linear_bn(mods: list[Optional[nn.Module]]) -> nn.Module:
    """linear, bn1d -> linear with bn folded on read."""
    return fold_bn_on_read(mods[0], mods[1])


def fuse_linear_relu(mods: list[Optional[nn.Module]]) -> nn.Module:
    """linear, relu (or linear, bn1d, relu) -> LinearReLU."""
    lin = fold_bn_on_read(mods[0], mods[1]) if len(mods) == 3 else _copy(mods[0])
    return LinearReLU(lin)


def fuse_bn_relu(mods: list[Optional[nn.Module]]) -> nn.Module:
    """bn, relu -> BNReLUNd."""
    return _BN_RELU[float_type(mods[0])](_copy(mods[0]))
