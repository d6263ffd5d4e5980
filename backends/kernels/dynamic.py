"""Dynamic and weight-only kernels: weights quantized once, activations quantized at run time (or never).

Every module here takes float inputs and returns float outputs, so lowering needs no quantize / dequantize
around them and no calibration. Targets (``BUILDERS`` keys are the table entries' ``lowering`` names):

* ``linear_dynamic`` / ``linear_relu_dynamic``: ``torch.ops.quantized.linear_dynamic`` (fbgemm, x86, qnnpack):
  one activation scale per tensor, computed by the kernel from each input;
* ``linear_dynamic_fp16`` / ``linear_relu_dynamic_fp16``: float16 weights (``linear_prepack_fp16``, fbgemm);
* ``linear_per_token`` / ``linear_relu_per_token``: :class:`PerTokenLinear`, uint8 activations with one scale and
  offset per row ("token") times per-channel int8 weights, on oneDNN's int8 GEMM
  (``torch.ops.onednn.qlinear_pointwise``) or ``torch._int_mm`` (plain integer tensors, no quantized tensor types);
* ``lstm_dynamic`` / ``gru_dynamic`` (``_fp16``): ``torch.quantized_lstm`` / ``torch.quantized_gru`` over cell
  parameters from ``make_quantized_cell_params_dynamic`` (``_fp16``); ``*_cell_dynamic``: the
  ``quantized_*_cell_dynamic`` kernels;
* ``embedding_{8,4}bit`` / ``embedding_bag_{8,4}bit``: fbgemm's row-wise ``embedding_bag_{byte,4bit}`` kernels.

Weights are stored compactly (int8 + float32 scales, or the packed row-wise table) as buffers; prepacked
kernel objects are rebuilt after ``load_state_dict``, unpickling and ``copy.deepcopy``.

Example:
    >>> import torch
    >>> from fxquant.backends.kernels.dynamic import PerTokenLinear
    >>> lin = torch.nn.Linear(64, 32)
    >>> q = PerTokenLinear.from_float(lin)
    >>> x = torch.randn(20, 64)
    >>> bool(torch.nn.functional.cosine_similarity(q(x), lin(x)).min() > 0.99)
    True
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from fxquant.backends.kernels.qtensor import LoweringSpec, call_packed, engine, entry
from fxquant.qparams import QParams, quantize_int

__all__ = ["BUILDERS", "DynamicLinear", "DynamicLinearFP16", "PerTokenLinear", "DynamicRNN", "DynamicRNNCell",
           "QuantizedEmbedding", "QuantizedEmbeddingBag", "supports", "per_token_kernel", "default_reduce_range"]

WeightFactory = Callable[[], nn.Module]


# ----------------------------------------------------------------------------------------- helpers

def _observe(factory: WeightFactory, w: torch.Tensor) -> QParams:
    obs = factory()
    obs(w)
    return obs.qparams()


def _register_qweight(m: nn.Module, name: str, w: torch.Tensor, qp: QParams) -> None:
    """Keep ``w`` quantized with ``qp`` as compact buffers: ``{name}_int`` (int8), ``{name}_scale`` (float32, one
    per row or one in all), ``{name}_zero_point`` (int32, only where some zero point is not 0)."""
    if qp.is_per_channel and qp.axis not in (0, None):
        raise ValueError(f"{name}: per-channel weight qparams must be along the output rows (axis 0), got {qp.axis}")
    m.register_buffer(f"{name}_int", quantize_int(w.detach().float(), qp))
    m.register_buffer(f"{name}_scale", qp.scale.to(torch.float32).reshape(-1 if qp.is_per_channel else ()).clone())
    if bool((qp.zero_point != 0).any()):
        m.register_buffer(f"{name}_zero_point", qp.zero_point.to(torch.int32).clone())


def _qweight(m: nn.Module, name: str) -> torch.Tensor:
    """The quantized tensor that the kernels' prepack functions take, rebuilt from the buffers."""
    ints, scale = getattr(m, f"{name}_int"), getattr(m, f"{name}_scale")
    zp = getattr(m, f"{name}_zero_point", None)
    if scale.dim() == 0:
        return torch._make_per_tensor_quantized_tensor(ints, float(scale), 0 if zp is None else int(zp))
    zp = torch.zeros_like(scale, dtype=torch.int64) if zp is None else zp.to(torch.int64)
    return torch._make_per_channel_quantized_tensor(ints, scale.to(torch.float64), zp, 0)


def _bias(module: nn.Module, name: str = "bias") -> Optional[torch.Tensor]:
    b = getattr(module, name, None)
    return None if b is None else b.detach().float().clone()


class _Repacking(nn.Module):
    """A module whose kernel object (``self._packed``) is rebuilt from its buffers whenever they change."""

    _engine: str = ""

    def _repack(self) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._repack()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_packed", None)  # script objects / opaque oneDNN tensors: rebuilt on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._repack()


def default_reduce_range(engine_name: str) -> bool:
    """Whether dynamic int8 kernels packed for ``engine_name`` should quantize their inputs to 7 bits on this CPU:
    what the built-in backend table of that name says (:meth:`BackendConfig.default_activation`). fbgemm's kernels,
    which ``x86`` also runs for its dynamic ops, sum u8 x s8 pairs in int16 on CPUs without VNNI, so the fbgemm
    table (and ``x86``'s fallback to it) asks for 7 bits there and for the full 8 with VNNI; qnnpack never does.
    An engine with no table of its name (``onednn``) keeps 8 bits."""
    from fxquant.backends import BACKENDS, get_backend_config

    return engine_name in BACKENDS and get_backend_config(engine_name).default_activation().reduce_range


# -------------------------------------------------------------------------------- dynamic int8 linear

#: (linear, linear + relu) overloads, indexed by ``relu`` (called through ``qtensor.call_packed``)
_DYNAMIC_OPS = (torch.ops.quantized.linear_dynamic.default, torch.ops.quantized.linear_relu_dynamic.default)
_DYNAMIC_FP16_OPS = (torch.ops.quantized.linear_dynamic_fp16.default,
                     torch.ops.quantized.linear_relu_dynamic_fp16.default)


class DynamicLinear(_Repacking):
    """Linear (optionally + ReLU) with int8 weights; the kernel quantizes each input per tensor at run time.

    Args:
        linear: the float ``nn.Linear`` (or the ``.op`` of a fused Linear+ReLU).
        weight: the weight qparams (per tensor or per channel, from the qconfig's weight observer).
        relu: apply ReLU to the output (``linear_relu_dynamic``).
        reduce_range: 7-bit activations (fbgemm on CPUs without VNNI); ``None``: what the table of
            ``engine_name`` uses on this CPU (:func:`default_reduce_range`).
        engine_name: the quantized engine the weight is packed for.
    """

    def __init__(self, linear: nn.Linear, weight: QParams, relu: bool = False, reduce_range: Optional[bool] = None,
                 engine_name: str = "x86") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if reduce_range is None:
            reduce_range = default_reduce_range(engine_name)
        self.relu, self.reduce_range, self._engine = bool(relu), bool(reduce_range), engine_name
        _register_qweight(self, "weight", linear.weight, weight)
        self.register_buffer("bias", _bias(linear))
        self._repack()

    def _repack(self) -> None:
        with engine(self._engine):
            self._packed = torch.ops.quantized.linear_prepack(_qweight(self, "weight"), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = _DYNAMIC_OPS[self.relu]
        if x.dim() == 1:  # the kernel wants a batch dimension
            return call_packed(op, x.float().unsqueeze(0), self._packed, self.reduce_range).squeeze(0)
        return call_packed(op, x.float(), self._packed, self.reduce_range)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, relu={self.relu}, engine={self._engine}"


class DynamicLinearFP16(_Repacking):
    """Linear (optionally + ReLU) with float16 weights (fbgemm's ``linear_dynamic_fp16``); float in and out."""

    def __init__(self, linear: nn.Linear, relu: bool = False, engine_name: str = "fbgemm") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.relu, self._engine = bool(relu), engine_name
        self.register_buffer("weight", linear.weight.detach().to(torch.float16).clone())
        self.register_buffer("bias", _bias(linear))
        self._repack()

    def _repack(self) -> None:
        with engine(self._engine):
            self._packed = torch.ops.quantized.linear_prepack_fp16(self.weight.float(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = _DYNAMIC_FP16_OPS[self.relu]
        if x.dim() == 1:
            return call_packed(op, x.float().unsqueeze(0), self._packed).squeeze(0)
        return call_packed(op, x.float(), self._packed)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, relu={self.relu}, weight=float16"


# ------------------------------------------------------------------------------ per-token int8 linear

def _onednn_gemm(q: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor) -> torch.Tensor:
    """``(q @ w.T) * w_scale`` in float32 by oneDNN's int8 GEMM (``q`` uint8; activation scale 1 and no bias:
    both are applied after)."""
    return torch.ops.onednn.qlinear_pointwise.default(q, 1.0, 0, packed, w_scale, w_zp, None, 1.0, 0,
                                                      torch.float32, "none", [], "")


@functools.lru_cache(maxsize=None)
def per_token_kernel() -> str:
    """``"onednn"`` where oneDNN's int8 GEMM runs here and gives exactly the integer products of uint8
    activations and int8 weights (checked once against ``torch._int_mm``), else ``"int_mm"``."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")):
        return "int_mm"
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, 256, (19, 48), dtype=torch.uint8, generator=g)
        w = torch.randint(-128, 128, (24, 40), dtype=torch.int8, generator=g)
        y = _onednn_gemm(a[:, :40], torch.ops.onednn.qlinear_prepack(w, None), torch.ones(24),
                         torch.zeros(24, dtype=torch.long))
        exact = torch._int_mm(torch.bitwise_xor(a[:, :40].view(torch.int8), -128), w.t()) + 128 * w.sum(1, dtype=torch.int32)
        return "onednn" if torch.equal(y, exact.float()) else "int_mm"
    except Exception:  # noqa: BLE001 - any failure means: use the portable kernel
        return "int_mm"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of a 2-d float tensor to uint8 with its own float scale and offset, ``x ~ q * scale + offset``
    (``scale = (max - min) / 255``, ``offset = min``), in one fused pass (fbgemm's row-wise quantizer).

    Returns:
        ``(q, scale, offset)``: ``q`` a strided ``[M, K]`` uint8 view, ``scale`` and ``offset`` ``[M, 1]`` float32.
    """
    packed = torch.ops.quantized.embedding_bag_byte_prepack(x)  # [M, K + 8]: K bytes, then float scale, offset
    k = x.shape[1]
    # a fresh contiguous tensor (a one-row slice counts as contiguous and would keep the packed row stride)
    scale_offset = packed[:, k:].clone(memory_format=torch.contiguous_format).view(torch.float32)
    return packed[:, :k], scale_offset[:, :1], scale_offset[:, 1:]


#: below this many rows oneDNN's per-call overhead (~50 us) outweighs its faster GEMM: ``torch._int_mm`` runs them
#: (1 thread, 384 x 1536: 125 vs 167 us at 1 row, 194 vs 276 us at 16; from 32 rows oneDNN is 1.1-1.8x faster)
ONEDNN_MIN_ROWS = 32


class _LastRows(threading.local):
    """The rows most recently quantized by a :class:`PerTokenLinear` on this thread, keyed by the input tensor
    object and its version counter: sibling projections that read the same tensor (attention's query, key and
    value) quantize it once. A weak reference: the cache never keeps an input alive."""

    key: Optional[tuple[Any, int, int]] = None
    rows: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None


_LAST_ROWS = _LastRows()


def _quantize_input(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of ``rows`` (a 2-d view of ``x``) with ``q`` contiguous, reusing the result for the
    same unchanged ``x`` (tensors made under ``torch.inference_mode`` have no version counter: not cached)."""
    cacheable = not x.is_inference()
    if cacheable:
        key = _LAST_ROWS.key
        if key is not None and key[0]() is x and key[1] == x._version and key[2] == rows.shape[1]:
            return _LAST_ROWS.rows  # type: ignore[return-value]
    q, scale, offset = quantize_rows(rows)
    result = (q.contiguous(), scale, offset)  # a contiguous copy costs less than oneDNN's reorder of the view
    if cacheable:
        _LAST_ROWS.key, _LAST_ROWS.rows = (weakref.ref(x), x._version, rows.shape[1]), result
    return result


class PerTokenLinear(_Repacking):
    """Linear (optionally + ReLU) on uint8 x int8: each row ("token") of the input gets its own uint8 grid at run
    time (a float scale and offset from the row's min and max), the weight per-channel symmetric int8 ahead of time.

    ``y = s_row * (q @ w_int.T) * s_col + offset_row * colsum + bias`` with ``colsum = s_col * w_int.sum(1)``; the
    integer products are exact (int32). One grid per token: an outlier token (transformers have a few, e.g.
    [CLS] or separators with huge activations) no longer flattens the resolution of all the others, which costs
    per-tensor dynamic quantization its accuracy; and the offset gives one-sided rows (after GELU) the full 8 bits.

    The rows are quantized by fbgemm's fused row-wise quantizer (one pass; once for projections that read the same
    tensor), the GEMM runs on oneDNN's int8 kernel with the column scales fused in (``kernel="onednn"``, inputs of
    at least :data:`ONEDNN_MIN_ROWS` rows) or on ``torch._int_mm`` (``kernel="int_mm"``, and smaller inputs), and
    the row scale, the offset term and the bias take two in-place passes over the output.

    Args:
        linear: the float ``nn.Linear``.
        weight: symmetric weight qparams (per channel or per tensor).
        relu: apply ReLU to the output.
        kernel: ``"onednn"``, ``"int_mm"`` or ``None`` (the fastest that works here: :func:`per_token_kernel`).
    """

    def __init__(self, linear: nn.Linear, weight: QParams, relu: bool = False, kernel: Optional[str] = None) -> None:
        super().__init__()
        if weight.qscheme not in (torch.per_channel_symmetric, torch.per_tensor_symmetric):
            raise ValueError(f"PerTokenLinear needs symmetric weights (no zero points), got {weight.qscheme}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.relu = relu
        self.kernel = kernel or per_token_kernel()
        if self.kernel not in ("onednn", "int_mm"):
            raise ValueError(f"kernel must be 'onednn' or 'int_mm', got {kernel!r}")
        _register_qweight(self, "weight", linear.weight, weight)
        self.register_buffer("bias", _bias(linear))
        self._repack()

    @classmethod
    def from_float(cls, linear: nn.Linear, kernel: Optional[str] = None) -> "PerTokenLinear":
        """With per-channel symmetric int8 weights from the weight's own range."""
        from fxquant.observers import PerChannelMinMaxObserver

        return cls(linear, _observe(PerChannelMinMaxObserver, linear.weight.detach()), kernel=kernel)

    def _repack(self) -> None:
        w = self.weight_int
        self._col_scale = self.weight_scale.expand(self.out_features).contiguous()  # per-tensor weights: one for all
        self._colsum = self._col_scale * w.sum(1, dtype=torch.int32).to(torch.float32)
        self._w_t = w.t()  # _int_mm takes the transposed view as it is, no copy
        if self.kernel == "onednn":
            self._packed = torch.ops.onednn.qlinear_prepack(w, None)
            self._w_zp = torch.zeros(self.out_features, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32:
            rows = rows.float()
        if rows.shape[0] == 0:
            return rows.new_zeros(*shape[:-1], self.out_features)
        q, scale, offset = _quantize_input(x, rows)
        if self.kernel == "onednn" and rows.shape[0] >= ONEDNN_MIN_ROWS:
            y = _onednn_gemm(q, self._packed, self._col_scale, self._w_zp)
        else:  # int8 x int8: q - 128, and the 128 moves into the offset
            y = torch.mul(torch._int_mm(torch.bitwise_xor(q.view(torch.int8), -128), self._w_t), self._col_scale)
            offset = torch.addcmul(offset, scale, torch.tensor(128.0))
        if self.bias is not None:
            torch.addcmul(self.bias, y, scale, out=y)
        else:
            y.mul_(scale)
        y.addr_(offset.reshape(-1), self._colsum)
        if self.relu:
            y.relu_()
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, relu={self.relu}, activations=uint8 per token, "
                f"kernel={self.kernel}")


# ------------------------------------------------------------------------------------ recurrent layers

def _rnn_suffixes(rnn: nn.Module) -> list[str]:
    dirs = 2 if getattr(rnn, "bidirectional", False) else 1
    return [f"_l{layer}{'_reverse' if d else ''}" for layer in range(rnn.num_layers) for d in range(dirs)]


class DynamicRNN(_Repacking):
    """``nn.LSTM`` / ``nn.GRU`` with int8 weights, the gate matmuls quantizing their inputs per tensor at run time
    (``torch.quantized_lstm`` / ``torch.quantized_gru`` over ``make_quantized_cell_params_dynamic``), or with
    float16 weights (``make_quantized_cell_params_fp16``, fbgemm).

    Takes what the float module takes: batched or unbatched input, ``batch_first``, optional ``hx``, a
    ``PackedSequence``; returns the same structure.

    Args:
        rnn: the float ``nn.LSTM`` or ``nn.GRU`` (no ``proj_size``).
        weight_observer: the qconfig's weight observer factory (one fresh observer per weight matrix).
        reduce_range: 7-bit activations (fbgemm on CPUs without VNNI); ``None``: what the table of
            ``engine_name`` uses on this CPU (:func:`default_reduce_range`).
        engine_name: the quantized engine the weights are packed for.
        dtype: ``torch.qint8`` or ``torch.float16`` (the weights).
    """

    def __init__(self, rnn: nn.Module, weight_observer: WeightFactory, reduce_range: Optional[bool] = None,
                 engine_name: str = "x86", dtype: torch.dtype = torch.qint8) -> None:
        super().__init__()
        self.dtype = dtype
        self.mode = "LSTM" if isinstance(rnn, nn.LSTM) else "GRU"
        self.input_size, self.hidden_size, self.num_layers = rnn.input_size, rnn.hidden_size, rnn.num_layers
        self.bidirectional, self.batch_first, self.has_bias = rnn.bidirectional, rnn.batch_first, rnn.bias
        self.dropout = float(rnn.dropout)
        if reduce_range is None:
            reduce_range = default_reduce_range(engine_name)
        self.reduce_range, self._engine = bool(reduce_range), engine_name
        self._suffixes = _rnn_suffixes(rnn)
        for sfx in self._suffixes:
            for kind in ("ih", "hh"):
                w = getattr(rnn, f"weight_{kind}{sfx}").detach()
                if dtype == torch.float16:
                    self.register_buffer(f"weight_{kind}{sfx}", w.to(torch.float16).clone())
                else:
                    _register_qweight(self, f"weight_{kind}{sfx}", w, _observe(weight_observer, w))
                b = getattr(rnn, f"bias_{kind}{sfx}") if rnn.bias else None
                self.register_buffer(f"bias_{kind}{sfx}", torch.zeros(w.shape[0]) if b is None else _bias(rnn, f"bias_{kind}{sfx}"))
        self._repack()

    def _repack(self) -> None:
        params = []
        with engine(self._engine):
            for sfx in self._suffixes:
                b_ih, b_hh = getattr(self, f"bias_ih{sfx}"), getattr(self, f"bias_hh{sfx}")
                if self.dtype == torch.float16:
                    params.append(torch.ops.quantized.make_quantized_cell_params_fp16(
                        torch.ops.quantized.linear_prepack_fp16(getattr(self, f"weight_ih{sfx}").float(), b_ih),
                        torch.ops.quantized.linear_prepack_fp16(getattr(self, f"weight_hh{sfx}").float(), b_hh)))
                    continue
                # the kernels add the bias packed with the weight (the separate bias arguments are not used)
                w_ih = torch.ops.quantized.linear_prepack(_qweight(self, f"weight_ih{sfx}"), b_ih)
                w_hh = torch.ops.quantized.linear_prepack(_qweight(self, f"weight_hh{sfx}"), b_hh)
                params.append(torch.ops.quantized.make_quantized_cell_params_dynamic(w_ih, w_hh, b_ih, b_hh,
                                                                                      self.reduce_range))
        self._packed = params

    def _zeros(self, batch: int, x: torch.Tensor) -> torch.Tensor:
        dirs = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * dirs, batch, self.hidden_size, dtype=x.dtype, device=x.device)

    def forward(self, x: Union[torch.Tensor, PackedSequence], hx: Any = None) -> Any:
        if isinstance(x, PackedSequence):
            return self._forward_packed(x, hx)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
            hx = None if hx is None else tuple(h.unsqueeze(1) for h in hx) if self.mode == "LSTM" else hx.unsqueeze(1)
        batch = x.shape[0 if self.batch_first else 1]
        x = x.float()
        args = (self.has_bias, self.num_layers, self.dropout, False, self.bidirectional, self.batch_first)
        if self.mode == "LSTM":
            h0 = (self._zeros(batch, x), self._zeros(batch, x)) if hx is None else hx
            out, h, c = torch.quantized_lstm(x, list(h0), self._packed, *args, dtype=self.dtype, use_dynamic=True)
            state: Any = (h, c)
        else:
            out, state = torch.quantized_gru(x, self._zeros(batch, x) if hx is None else hx, self._packed, *args)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            state = tuple(s.squeeze(1) for s in state) if self.mode == "LSTM" else state.squeeze(1)
        return out, state

    def _forward_packed(self, x: PackedSequence, hx: Any) -> Any:
        batch = int(x.batch_sizes[0])
        perm = x.sorted_indices
        if hx is None:
            hx = (self._zeros(batch, x.data), self._zeros(batch, x.data)) if self.mode == "LSTM" else self._zeros(batch, x.data)
        elif perm is not None:  # hidden states come in the caller's batch order
            hx = tuple(h.index_select(1, perm) for h in hx) if self.mode == "LSTM" else hx.index_select(1, perm)
        args = (self.has_bias, self.num_layers, self.dropout, False, self.bidirectional)
        if self.mode == "LSTM":
            data, h, c = torch.quantized_lstm(x.data.float(), x.batch_sizes, list(hx), self._packed, *args,
                                              dtype=self.dtype, use_dynamic=True)
            state: Any = (h, c)
        else:
            data, state = torch.quantized_gru(x.data.float(), x.batch_sizes, hx, self._packed, *args)
        if x.unsorted_indices is not None:
            back = x.unsorted_indices
            state = tuple(s.index_select(1, back) for s in state) if self.mode == "LSTM" else state.index_select(1, back)
        return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices), state

    def extra_repr(self) -> str:
        return (f"{self.mode}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, batch_first={self.batch_first}), weights={self.dtype}")


_CELL_OPS = {kind: getattr(torch.ops.quantized, f"quantized_{kind}_cell_dynamic")
             for kind in ("lstm", "gru", "rnn_tanh", "rnn_relu")}
_CELL_ENTRIES = {kind: entry(op) for kind, op in _CELL_OPS.items()}  # called once per time step: see qtensor.entry


class DynamicRNNCell(_Repacking):
    """``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` with int8 weights (``quantized_*_cell_dynamic``)."""

    def __init__(self, cell: nn.Module, weight_observer: WeightFactory, engine_name: str = "x86") -> None:
        super().__init__()
        if isinstance(cell, nn.LSTMCell):
            self.kind = "lstm"
        elif isinstance(cell, nn.GRUCell):
            self.kind = "gru"
        else:
            self.kind = f"rnn_{cell.nonlinearity}"
        self.input_size, self.hidden_size, self._engine = cell.input_size, cell.hidden_size, engine_name
        for kind in ("ih", "hh"):
            w = getattr(cell, f"weight_{kind}").detach()
            _register_qweight(self, f"weight_{kind}", w, _observe(weight_observer, w))
            b = getattr(cell, f"bias_{kind}", None)
            self.register_buffer(f"bias_{kind}", torch.zeros(w.shape[0]) if b is None else b.detach().float().clone())
        self._repack()

    def _repack(self) -> None:
        with engine(self._engine):
            self._packed = [torch.ops.quantized.linear_prepack(_qweight(self, f"weight_{k}"), getattr(self, f"bias_{k}"))
                            for k in ("ih", "hh")]

    def forward(self, x: torch.Tensor, hx: Any = None) -> Any:
        unbatched = x.dim() == 1
        x = x.float().unsqueeze(0) if unbatched else x.float()
        zeros = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype)
        op = (_CELL_ENTRIES if type(self._packed[0]) is torch.ScriptObject else _CELL_OPS)[self.kind]
        if self.kind == "lstm":
            h, c = (zeros, zeros) if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if unbatched else hx
            out: Any = op(x, [h, c], *self._packed, self.bias_ih, self.bias_hh)
            return tuple(o.squeeze(0) for o in out) if unbatched else out
        h = zeros if hx is None else hx.unsqueeze(0) if unbatched else hx
        out = op(x, h, *self._packed, self.bias_ih, self.bias_hh)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"{self.kind}({self.input_size}, {self.hidden_size}), weights=int8"


# ------------------------------------------------------------------------------------ embedding tables

_EMBED_OPS = {8: (torch.ops.quantized.embedding_bag_byte_prepack, torch.ops.quantized.embedding_bag_byte_rowwise_offsets),
              4: (torch.ops.quantized.embedding_bag_4bit_prepack, torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)}


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` with 8- or 4-bit rows (float scale and offset per row, stored with the row): the packed
    table of fbgemm's row-wise embedding kernels, which also do the lookup (one row per index)."""

    def __init__(self, emb: nn.Embedding, bits: int = 8) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits = emb.num_embeddings, emb.embedding_dim, bits
        self.padding_idx = emb.padding_idx
        self.register_buffer("packed_weight", _EMBED_OPS[bits][0](emb.weight.detach().float().contiguous()))

    def _lookup(self, indices: torch.Tensor, offsets: Optional[torch.Tensor], mode: int,
                per_sample_weights: Optional[torch.Tensor] = None, include_last_offset: bool = False) -> torch.Tensor:
        return _EMBED_OPS[self.bits][1](self.packed_weight, indices, offsets, False, mode, False, per_sample_weights,
                                        None, include_last_offset)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        flat = indices.reshape(-1)
        offsets = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
        out = self._lookup(flat, offsets, mode=0)
        return out.reshape(*indices.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


_BAG_MODES = ("sum", "mean")


class QuantizedEmbeddingBag(QuantizedEmbedding):
    """``nn.EmbeddingBag`` (``mode`` sum or mean) with 8- or 4-bit rows; same call signature as the float module."""

    def __init__(self, bag: nn.EmbeddingBag, bits: int = 8) -> None:
        super().__init__(bag, bits)  # type: ignore[arg-type]
        self.mode, self.include_last_offset = bag.mode, bag.include_last_offset

    def forward(self, indices: torch.Tensor, offsets: Optional[torch.Tensor] = None,  # type: ignore[override]
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        fixed = indices.dim() == 2
        if fixed:  # fixed-length bags, one per row
            rows, length = indices.shape
            offsets = torch.arange(0, rows * length, length, dtype=indices.dtype, device=indices.device)
            indices = indices.reshape(-1)
            per_sample_weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
        elif offsets is None:
            raise ValueError("QuantizedEmbeddingBag: 1-d input needs offsets (as for nn.EmbeddingBag)")
        psw = None if per_sample_weights is None else per_sample_weights.float()
        last = self.include_last_offset and not fixed
        offsets = offsets.to(indices.dtype)
        out = self._lookup(indices, offsets, 0, psw, last)  # the kernels sum whatever mode they are given
        if self.mode == "mean":
            ends = offsets[1:] if last else torch.cat([offsets[1:], offsets.new_tensor([indices.numel()])])
            starts = offsets[:-1] if last else offsets
            out = out / (ends - starts).clamp(min=1).unsqueeze(1).to(out.dtype)  # empty bags stay 0
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}"


# ------------------------------------------------------------------------------------- lowering targets

def _linear_of(module: nn.Module) -> nn.Linear:
    return getattr(module, "op", module)  # a fused Linear + ReLU keeps its Linear in .op


def _weight_qparams(spec: LoweringSpec, module: nn.Module) -> QParams:
    return spec.weight if spec.weight is not None else _observe(spec.kwargs["weight_observer"], module.weight.detach())


def _dynamic_linear(spec: LoweringSpec, engine_name: str) -> nn.Module:
    lin = _linear_of(spec.module)
    return DynamicLinear(lin, _weight_qparams(spec, lin), relu=spec.target.startswith("linear_relu"),
                         reduce_range=spec.kwargs.get("reduce_range"), engine_name=engine_name)


def _fp16_linear(spec: LoweringSpec, engine_name: str) -> nn.Module:
    return DynamicLinearFP16(_linear_of(spec.module), relu=spec.target.startswith("linear_relu"),
                             engine_name=engine_name)


def _per_token_linear(spec: LoweringSpec, engine_name: str) -> nn.Module:
    lin = _linear_of(spec.module)
    return PerTokenLinear(lin, _weight_qparams(spec, lin), relu=spec.target.startswith("linear_relu"),
                          kernel=spec.kwargs.get("kernel"))


def _rnn(spec: LoweringSpec, engine_name: str) -> nn.Module:
    dtype = torch.float16 if spec.target.endswith("fp16") else torch.qint8
    return DynamicRNN(spec.module, spec.kwargs["weight_observer"], spec.kwargs.get("reduce_range"),
                      engine_name, dtype)


def _cell(spec: LoweringSpec, engine_name: str) -> nn.Module:
    return DynamicRNNCell(spec.module, spec.kwargs["weight_observer"], engine_name)


def _embedding(spec: LoweringSpec, engine_name: str) -> nn.Module:
    bits = 4 if spec.target.endswith("4bit") else 8
    cls = QuantizedEmbeddingBag if spec.target.startswith("embedding_bag") else QuantizedEmbedding
    return cls(spec.module, bits)


#: lowering target -> builder ``(spec, engine) -> module``; ``spec.kwargs`` holds ``weight_observer`` (the
#: qconfig's weight observer factory), ``reduce_range`` and, for the per-token linear, an optional ``kernel``
BUILDERS: dict[str, Callable[[LoweringSpec, str], nn.Module]] = {
    "linear_dynamic": _dynamic_linear, "linear_relu_dynamic": _dynamic_linear,
    "linear_dynamic_fp16": _fp16_linear, "linear_relu_dynamic_fp16": _fp16_linear,
    "linear_per_token": _per_token_linear, "linear_relu_per_token": _per_token_linear,
    "lstm_dynamic": _rnn, "gru_dynamic": _rnn, "lstm_dynamic_fp16": _rnn, "gru_dynamic_fp16": _rnn,
    "lstm_cell_dynamic": _cell, "gru_cell_dynamic": _cell, "rnn_cell_dynamic": _cell,
    **{f"{kind}_{bits}bit": _embedding for kind in ("embedding", "embedding_bag") for bits in (8, 4)},
}


def supports(target: str, module: Optional[nn.Module]) -> Optional[str]:
    """``None`` if the dynamic target ``target`` can run ``module``; else the reason it stays float."""
    if target.startswith("lstm_dynamic") and getattr(module, "proj_size", 0):
        return "LSTM with proj_size > 0 (the quantized LSTM kernels have no projection)"
    if target.startswith("embedding") and getattr(module, "max_norm", None) is not None:
        return "max_norm renormalises rows of the float table at lookup; the quantized table cannot"
    if target.startswith("embedding_bag"):
        if module.mode not in _BAG_MODES:
            return f"EmbeddingBag mode '{module.mode}' (the quantized kernels do sum and mean)"
        if module.padding_idx is not None:
            return "EmbeddingBag with padding_idx (the quantized kernels do not skip it)"
    if target.endswith("4bit") and module is not None and module.embedding_dim % 2:
        return f"4-bit rows need an even embedding_dim (got {module.embedding_dim}); use 8 bits"
    return None
