"""Calibration and quantization-aware training across processes and machines (``torch.distributed``).

Every rank runs the same prepared model on its own shard of the data; this module merges what the observers
saw with ``torch.distributed`` collectives, so that every rank ends with the same statistics, the same
qparams and, after ``convert_fx``, a bit-identical int8 model. It works inside an initialized process group
(``torchrun`` + ``torch.distributed.init_process_group()``, gloo on CPUs or NCCL on GPUs) and never starts one.

* :func:`sync_observers` merges the statistics every rank holds (call it once, after local calibration).
* ``fxquant.calibrate(model, data, distributed=True)`` (:func:`calibrate_distributed`) calibrates each rank
  on its shard and syncs; order-dependent observers (moving averages) are synced after every batch, so the
  result is the one a single process gets on the global batches (each global batch = the ranks' batches).
* :func:`sync_each_step` keeps the observers of a QAT model in step under ``DistributedDataParallel``;
  :func:`convert_sync_batchnorm` gives the folded batch norms of the QAT modules global batch statistics.

How each observer is merged (the *sync protocol*). An observer class may define two generator methods:

* ``_sync_merge(self)``: merge independent per-rank statistics into those of the union of the shards;
* ``_sync_step(self)`` (order-dependent observers only): combine the ranks' states after each rank observed
  one batch from a state that was identical on every rank.

Each yields a list of requests (:class:`Reduce` ``min`` / ``max`` / ``sum`` of a tensor, or :class:`Gather` of a
picklable object) and receives the list of results; the requests of all observers in a round travel in one
collective per kind. The round structure must not depend on the data. Built-in observers get their
reducers from the table in this module; a subclass with the same buffers and the same ``_merge_stats`` uses its
base's reducer, and any other observer is merged by gathering every rank's ``state_dict`` and folding them
with :meth:`fxquant.observers.ObserverBase.merge_` in rank order (exact and identical on every rank, slower).

Example (in each process of ``torchrun --nproc_per_node=2 script.py``)::

    torch.distributed.init_process_group("gloo")
    prepared = fxquant.prepare_fx(model, mapping, example_inputs, backend_config="x86")
    fxquant.calibrate(prepared, my_shard_of_the_data, distributed=True)
    quantized = fxquant.convert_fx(prepared)           # the same int8 model on every rank
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Any, Callable, Generator, Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from fxquant import _histogram
from fxquant.errors import CalibrationError, FxQuantError
from fxquant.fake_quantize import FakeQuantize
from fxquant.observers import (FixedQParamsObserver, FloatQParamsObserver, HistogramObserver, MinMaxObserver,
                               MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver, ObserverBase,
                               PerChannelMinMaxObserver, PlaceholderObserver, _format_kwargs)
from fxquant.qat import _BnFold
from fxquant.qat_fake_quantize import FusedMovingAvgObsFakeQuantize, LearnableFakeQuantize

__all__ = ["DistributedError", "Reduce", "Gather", "sync_observers", "calibrate_distributed", "sync_each_step",
           "StepSync", "convert_sync_batchnorm", "SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d",
           "check_same_model"]


class DistributedError(FxQuantError):
    """No process group, ranks whose models differ, or a rank that failed while the others waited."""


@dataclasses.dataclass(frozen=True)
class Reduce:
    """A request: reduce ``tensor`` over all ranks with ``op`` (``"min"``, ``"max"`` or ``"sum"``)."""

    op: str
    tensor: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Gather:
    """A request: the list of every rank's ``obj`` (picklable), in rank order."""

    obj: Any


Requests = list[Union[Reduce, Gather]]
SyncGen = Generator[Requests, list, None]


# ------------------------------------------------------------------------------------------ process group

def _group_of(group: Optional[Any], fn: str) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(f"{fn}: torch.distributed has no initialized process group; call "
                               "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPU) in every "
                               "process first (under torchrun, init_process_group() reads the environment), or "
                               "calibrate without distributed=True")
    return group if group is not None else dist.group.WORLD


def _device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _unwrap(model: nn.Module) -> nn.Module:
    """The prepared model inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


# ------------------------------------------------------------------------------------------ fingerprints

def _fingerprint(model: nn.Module) -> list[str]:
    """One line per module (name and class), graph (a hash of its code) and observer (its arguments too)."""
    lines = []
    for name, m in model.named_modules():
        label = name or "<root>"
        if isinstance(m, fx.GraphModule):
            lines.append(f"graph {label}: code {hashlib.sha1(m.code.encode()).hexdigest()[:16]}")
        elif not isinstance(m, (ObserverBase, FakeQuantize)):
            lines.append(f"module {label}: {type(m).__qualname__}")
        if isinstance(m, ObserverBase):
            where = f" ({m.where})" if m.where else ""
            lines.append(f"observer {label}{where}: {type(m).__qualname__}({_format_kwargs(m._config())})")
        elif isinstance(m, FakeQuantize):
            lines.append(f"fake quantizer {label}: {type(m).__qualname__}")
    return lines


def _first_difference(mine: list[str], theirs: list[str]) -> str:
    for a, b in zip(mine, theirs):
        if a != b:
            return f"{a!r} vs {b!r}"
    longer, n = (mine, len(theirs)) if len(mine) > len(theirs) else (theirs, len(mine))
    return f"{len(mine)} vs {len(theirs)} entries; first extra: {longer[n]!r}"


def _check_fingerprints(fingerprints: list[Any], fn: str) -> None:
    """Raise on every rank when a rank failed (a string) or the ranks' fingerprints differ."""
    for rank, fp in enumerate(fingerprints):
        if isinstance(fp, str):
            raise DistributedError(f"{fn}: rank {rank} failed before syncing: {fp}")
    for rank, fp in enumerate(fingerprints[1:], start=1):
        if fp != fingerprints[0]:
            raise DistributedError(
                f"{fn}: the model on rank {rank} differs from rank 0 ({_first_difference(fingerprints[0], fp)}); "
                "every rank must prepare the same model with the same qconfig mapping, backend and example input "
                "shapes")


def check_same_model(model: nn.Module, group: Optional[Any] = None, error: Optional[str] = None) -> None:
    """Check that every rank holds the same graph and observers (one ``all_gather_object``).

    Args:
        model: the prepared model (or a ``DistributedDataParallel`` around it).
        group: the process group (default: the world).
        error: pass a message instead of a fingerprint to make every rank raise (a rank that failed).

    Raises:
        DistributedError: no process group, a failed rank, or the first difference between the ranks' models.
    """
    group = _group_of(group, "check_same_model")
    mine: Any = error if error is not None else _fingerprint(_unwrap(model))
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    _check_fingerprints(gathered, "sync")


# ------------------------------------------------------------------------------------------ collectives

def _flat(tensors: list[torch.Tensor], signs: list[float], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat([t.detach().reshape(-1).to(device, torch.float64) * s for t, s in zip(tensors, signs)])


def _execute(requests: Requests, group: Any, device: torch.device) -> list[Any]:
    """Run one round: all min/max requests in one MIN all-reduce, all sums in one SUM, all gathers in one."""
    minmax = [i for i, r in enumerate(requests) if isinstance(r, Reduce) and r.op in ("min", "max")]
    sums = [i for i, r in enumerate(requests) if isinstance(r, Reduce) and r.op == "sum"]
    gathers = [i for i, r in enumerate(requests) if isinstance(r, Gather)]
    bad = [r.op for r in requests if isinstance(r, Reduce) and r.op not in ("min", "max", "sum")]
    if bad:
        raise ValueError(f"sync protocol: unknown reduction {bad[0]!r}; use 'min', 'max' or 'sum'")
    signs = [1.0 if requests[i].op == "min" else -1.0 for i in minmax]  # max(x) = -min(-x)
    mins = _flat([requests[i].tensor for i in minmax], signs, device)
    total = _flat([requests[i].tensor for i in sums], [1.0] * len(sums), device)
    sizes = torch.tensor([mins.numel(), total.numel(), len(gathers)], dtype=torch.float64, device=device)
    both = torch.cat([sizes, -sizes])
    dist.all_reduce(both, op=dist.ReduceOp.MIN, group=group)
    if not torch.equal(both[:3], -both[3:]):
        raise DistributedError(f"sync: the ranks' observer states have different sizes (this rank: {sizes.tolist()}"
                               "); an observer that saw data on some ranks only, or models that differ")
    results: list[Any] = [None] * len(requests)
    for idx, flat, op in ((minmax, mins, dist.ReduceOp.MIN), (sums, total, dist.ReduceOp.SUM)):
        if not idx:
            continue
        dist.all_reduce(flat, op=op, group=group)
        offset = 0
        for i in idx:
            t = requests[i].tensor
            sign = -1.0 if requests[i].op == "max" else 1.0
            piece = flat[offset:offset + t.numel()] * sign
            results[i] = piece.reshape(t.shape).to(t.device, t.dtype)
            offset += t.numel()
    if gathers:
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, [requests[i].obj for i in gathers], group=group)
        for k, i in enumerate(gathers):
            results[i] = [per_rank[k] for per_rank in gathered]
    return results


def _run(gens: list[SyncGen], group: Any) -> None:
    """Advance all sync generators in lock step, one bucketed round of collectives per step."""
    device = _device(group)
    active: list[tuple[SyncGen, Requests]] = []
    for g in gens:
        try:
            active.append((g, next(g)))
        except StopIteration:
            pass
    while active:
        results = _execute([r for _, reqs in active for r in reqs], group, device)
        nxt, offset = [], 0
        for g, reqs in active:
            mine, offset = results[offset:offset + len(reqs)], offset + len(reqs)
            try:
                nxt.append((g, g.send(mine)))
            except StopIteration:
                pass
        active = nxt


# ------------------------------------------------------------------------------------ built-in reducers
# each is a generator function taking the observer; see the module docstring for the protocol

def _merge_nothing(obs: ObserverBase) -> SyncGen:
    """Placeholder / fixed qparams: nothing observed; their arguments were compared by the fingerprint."""
    return
    yield  # pragma: no cover - makes this a generator


def _agree_channels(obs: Any) -> SyncGen:
    """Per-channel buffers are empty until the first batch: give them the channel count every rank agrees on."""
    ndim = getattr(obs, "input_ndim", None)
    reqs: Requests = [Reduce("max", torch.tensor(obs.min_val.numel()))]
    reqs += [Reduce("max", ndim)] if ndim is not None else []
    res = yield reqs
    channels = int(res[0])
    if channels and obs.min_val.numel() == 0:
        obs.min_val = torch.full((channels,), float("inf"), device=obs.min_val.device)
        obs.max_val = torch.full((channels,), float("-inf"), device=obs.max_val.device)
        if ndim is not None:
            obs.input_ndim.copy_(res[1])


def _merge_range(obs: Any) -> SyncGen:
    """Running min / max (per tensor or per channel): all-reduce MIN and MAX (exact)."""
    if isinstance(obs, (PerChannelMinMaxObserver, FloatQParamsObserver)):
        yield from _agree_channels(obs)
    lo, hi = yield [Reduce("min", obs.min_val), Reduce("max", obs.max_val)]
    with torch.no_grad():
        obs.min_val.copy_(lo)
        obs.max_val.copy_(hi)


def _merge_moving(obs: Any) -> SyncGen:
    """Moving averages merged as ``merge_`` does: the ranks' averages weighted by their batch counts.

    Values every rank holds identically (already synced) are kept as they are, bit for bit.
    """
    batches = obs.batches.to(torch.float64)  # read before the counters are summed
    if isinstance(obs, PerChannelMinMaxObserver):
        yield from _agree_channels(obs)
    seen = torch.isfinite(obs.min_val)
    weight = torch.where(seen, batches, torch.zeros((), dtype=torch.float64))
    lo_w = torch.where(seen, obs.min_val.double() * weight, torch.zeros((), dtype=torch.float64))
    hi_w = torch.where(seen, obs.max_val.double() * weight, torch.zeros((), dtype=torch.float64))
    res = yield [Reduce("min", obs.min_val), Reduce("max", obs.min_val), Reduce("min", obs.max_val),
                 Reduce("max", obs.max_val), Reduce("sum", lo_w), Reduce("sum", hi_w), Reduce("sum", weight)]
    min_lo, max_lo, min_hi, max_hi, sum_lo, sum_hi, total = res
    with torch.no_grad():
        total = total.clamp(min=1.0)
        obs.min_val.copy_(torch.where(min_lo == max_lo, min_lo, (sum_lo / total).to(obs.min_val.dtype)))
        obs.max_val.copy_(torch.where(min_hi == max_hi, max_hi, (sum_hi / total).to(obs.max_val.dtype)))


def _step_moving(obs: Any) -> SyncGen:
    """One lock step of a moving average: MIN of the mins, MAX of the maxes.

    From a state ``m`` identical on every rank, rank ``r`` holds ``m + c * (b_r - m)`` after its batch ``b_r``;
    that is monotone in ``b_r`` (also in float arithmetic), so the MIN over ranks is exactly
    ``m + c * (min_r b_r - m)``: the update a single process makes for the global batch.
    """
    if isinstance(obs, PerChannelMinMaxObserver):
        yield from _agree_channels(obs)
    lo, hi = yield [Reduce("min", obs.min_val), Reduce("max", obs.max_val)]
    with torch.no_grad():
        obs.min_val.copy_(lo)
        obs.max_val.copy_(hi)


def _merge_histogram(obs: HistogramObserver) -> SyncGen:
    """Global range by MIN / MAX, each rank's histogram re-binned onto it, then summed (as ``merge_``)."""
    lo, hi = yield [Reduce("min", obs.min_val), Reduce("max", obs.max_val)]
    counts = torch.zeros(obs.bins, dtype=torch.int64, device=obs.min_val.device)  # a rank without data: empty
    if obs.has_data:
        counts = _histogram.rebin(obs.histogram, float(obs.min_val), float(obs.max_val), float(lo), float(hi))
    (total,) = yield [Reduce("sum", counts)]
    with torch.no_grad():
        obs.histogram = total.to(obs.min_val.device).clone()
        obs.min_val.copy_(lo)
        obs.max_val.copy_(hi)


def _merge_generic(obs: ObserverBase) -> SyncGen:
    """Any observer with ``merge_``: gather every rank's state dict, fold them in rank order on every rank."""
    if type(obs)._merge_stats is ObserverBase._merge_stats:
        raise DistributedError(f"cannot sync {obs._describe()}: {type(obs).__name__} implements neither the sync "
                               "protocol (_sync_merge, see fxquant.distributed) nor _merge_stats (merge_)")
    state = {k: v.detach().cpu() for k, v in obs.state_dict().items()}
    (states,) = yield [Gather(state)]
    merged = copy.deepcopy(obs)
    merged.load_state_dict(states[0])
    for other_state in states[1:]:
        other = copy.deepcopy(obs)
        other.load_state_dict(other_state)
        merged.merge_(other)
    obs.load_state_dict(merged.state_dict())


def _counters(obs: ObserverBase, op: str) -> SyncGen:
    """``batches`` / ``nonfinite_count``: summed when merging shards, the largest after a lock step."""
    res = yield [Reduce(op, obs.batches), Reduce(op, obs.nonfinite_count)]
    obs.batches.copy_(res[0])
    obs.nonfinite_count.copy_(res[1])


_COUNTERS = {"batches", "nonfinite_count"}
Reducer = Callable[[Any], SyncGen]


@dataclasses.dataclass(frozen=True)
class _Reducers:
    """How one observer class syncs: ``merge`` (shards), ``step`` (after a lock step; None: only merged),
    ``ordered`` (its statistics depend on the batch order: calibration syncs it after every batch),
    ``counters`` (the counters are reduced separately; False where ``merge`` restores them itself)."""

    merge: Reducer
    step: Optional[Reducer] = None
    ordered: bool = False
    counters: bool = True


_MINMAX, _PER_CHANNEL = {"min_val", "max_val"}, {"min_val", "max_val", "input_ndim"}
#: class -> (its reducers, the buffers they know besides the counters)
_REDUCERS: dict[type, tuple[_Reducers, set[str]]] = {
    PlaceholderObserver: (_Reducers(_merge_nothing), set()),
    FixedQParamsObserver: (_Reducers(_merge_nothing), {"scale", "zero_point"}),
    MovingAveragePerChannelMinMaxObserver: (_Reducers(_merge_moving, _step_moving, ordered=True), _PER_CHANNEL),
    MovingAverageMinMaxObserver: (_Reducers(_merge_moving, _step_moving, ordered=True), _MINMAX),
    PerChannelMinMaxObserver: (_Reducers(_merge_range, _merge_range), _PER_CHANNEL),
    MinMaxObserver: (_Reducers(_merge_range, _merge_range), _MINMAX),
    FloatQParamsObserver: (_Reducers(_merge_range, _merge_range), _MINMAX),
    HistogramObserver: (_Reducers(_merge_histogram), {"histogram", "min_val", "max_val"}),
}


def _reducers(obs: ObserverBase) -> _Reducers:
    """The reducers of ``obs``: its class's own protocol, a known base class's, or the generic merge."""
    cls = type(obs)
    if hasattr(cls, "_sync_merge"):
        return _Reducers(cls._sync_merge, getattr(cls, "_sync_step", None),  # type: ignore[attr-defined]
                         ordered=bool(getattr(cls, "_sync_ordered", False)), counters=False)
    buffers = {name for name, _ in obs.named_buffers(recurse=False)} - _COUNTERS
    for base in cls.__mro__:
        if base in _REDUCERS:
            reducers, known = _REDUCERS[base]
            if buffers == known and cls._merge_stats is base._merge_stats:
                return reducers
            break
    return _Reducers(_merge_generic, counters=False)


# ------------------------------------------------------------------------------------------ public API

def _observers(model: nn.Module) -> list[ObserverBase]:
    return [m for m in _unwrap(model).modules() if isinstance(m, ObserverBase)]


def _refresh_fake_quant(fq: FakeQuantize) -> None:
    """Recompute a fake quantizer's ``scale`` / ``zero_point`` from its (synced) observer, as its forward does."""
    obs = fq.activation_post_process
    if isinstance(fq, LearnableFakeQuantize) or not obs.has_data:
        return
    if isinstance(fq, FusedMovingAvgObsFakeQuantize) and fq.native and bool(torch.isfinite(obs.min_val).all()):
        # the native kernel's own qparams formula: one call that moves the range by 0 and recomputes them
        on = torch.ones(1, dtype=torch.uint8, device=obs.min_val.device)
        x = torch.stack([obs.min_val, obs.max_val], dim=-1).reshape(-1, 2) if fq.is_per_channel \
            else torch.stack([obs.min_val, obs.max_val])
        with torch.no_grad():
            torch.fused_moving_avg_obs_fake_quant(x, on, on, obs.min_val, obs.max_val, fq.scale, fq.zero_point, 0.0,
                                                  fq.quant_min, fq.quant_max, 0, fq.is_per_channel, fq.is_symmetric)
        return
    with torch.no_grad():
        fq._update_qparams()


def _refresh_all(model: nn.Module) -> None:
    for m in _unwrap(model).modules():
        if isinstance(m, FakeQuantize):
            _refresh_fake_quant(m)


def sync_observers(model: nn.Module, group: Optional[Any] = None) -> nn.Module:
    """Merge the observer statistics of every rank, so that every rank holds the same ones (and qparams).

    Call it in every rank, once, after each rank calibrated its shard locally (``fxquant.calibrate(...,
    distributed=True)`` does both). Min/max statistics are all-reduced (MIN / MAX, per channel too);
    histograms are re-binned onto the global range and summed; moving averages become the batch-weighted mean
    of the ranks' averages (as ``merge_``: an average has no exact merge; lock-step syncing is exact, see
    :func:`calibrate_distributed`); placeholder and fixed-qparams observers are checked equal. Fake quantizers'
    ``scale`` / ``zero_point`` are recomputed from the merged statistics (learned LSQ qparams are parameters,
    kept equal by ``DistributedDataParallel``). The counters ``batches`` / ``nonfinite_count`` are summed.

    Args:
        model: the prepared model (or the ``DistributedDataParallel`` around it), modified in place.
        group: the process group (default: the world).

    Returns:
        ``model``.

    Raises:
        DistributedError: no initialized process group, or ranks whose graphs or observers differ (naming the
            first difference); raised on every rank, nothing hangs.
    """
    group = _group_of(group, "sync_observers")
    check_same_model(model, group)
    _sync(model, group, step=False)
    return model


def _sync(model: nn.Module, group: Any, step: bool, only: Optional[Callable[[ObserverBase], bool]] = None) -> None:
    gens: list[SyncGen] = []
    for obs in _observers(model):
        if only is not None and not only(obs):
            continue
        reducers = _reducers(obs)
        fn = reducers.step if step else reducers.merge
        if fn is None:
            continue
        gens.append(fn(obs))
        if reducers.counters:
            gens.append(_counters(obs, "max" if step else "sum"))
        obs._fxq_synced = True  # type: ignore[attr-defined]
    _run(gens, group)
    _refresh_all(model)


def _is_ordered(obs: ObserverBase) -> bool:
    """Whether the observer's statistics depend on the batch order (calibration syncs it after every batch)."""
    return _reducers(obs).ordered


# ------------------------------------------------------------------------------------------ calibration

def _run_local(model: nn.Module, data: Iterable[Any], max_batches: Optional[int], group: Any, lockstep: bool,
               progress: bool) -> tuple[int, Optional[BaseException]]:
    """This rank's calibration loop; with ``lockstep`` the order-dependent observers are synced after each batch.

    Returns the number of batches run and the error that stopped this rank (never raised here, so that the
    other ranks can be told instead of waiting in a collective).
    """
    from tqdm.auto import tqdm

    from fxquant.calibrate import run_batch

    count, error = 0, None
    iterator = iter(tqdm(data, desc="calibrating", leave=False,
                         disable=not progress or dist.get_rank(group) != 0))
    while True:
        batch = None
        if error is None and (max_batches is None or count < max_batches):
            try:
                batch = next(iterator, None)
                if batch is not None:
                    run_batch(model, batch)
                    count += 1
            except Exception as exc:  # noqa: BLE001 - handed to every rank below
                shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
                error = CalibrationError(f"calibration batch {count} ({shape}) failed in the model: "
                                         f"{type(exc).__name__}: {exc}. Batches must have the structure and shapes "
                                         "of example_inputs.")
                error.__cause__ = exc
        if not lockstep:
            if batch is None or error is not None:
                return count, error
            continue
        flags = torch.tensor([float(batch is not None and error is None), float(error is not None)],
                             device=_device(group))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        if flags[1] or not flags[0]:
            return count, error
        _sync(model, group, step=True, only=_is_ordered)


def calibrate_distributed(model: nn.Module, data: Iterable[Any], progress: bool = True,
                          max_batches: Optional[int] = None, group: Optional[Any] = None) -> None:
    """Calibrate every rank on its shard of the data and merge the statistics across ranks.

    ``fxquant.calibrate(model, data, distributed=True)`` calls this. Every rank must call it with the same
    prepared model; the shards may have different lengths. Observers whose statistics depend on the batch
    order (moving averages) are synced after every batch (one small all-reduce), which makes them exactly what
    one process computes on the global batches (each global batch = the ranks' batches of that step); all the
    others are merged once at the end (:func:`sync_observers`). Calling it again adds more data: observers
    synced before are counted once (ranks other than 0 reset their merged copy first).

    Args:
        model: the result of ``prepare_fx`` (modified in place, as ``calibrate`` does).
        data: this rank's batches (e.g. a DataLoader with a ``DistributedSampler``).
        progress: a tqdm progress bar on rank 0.
        max_batches: stop each rank after this many batches.
        group: the process group (default: the world).

    Raises:
        DistributedError: no process group; models that differ between ranks; another rank failed.
        CalibrationError: as ``calibrate`` (this rank's batch failed; no data on any rank).
    """
    from fxquant.calibrate import _check_prepared

    group = _group_of(group, "calibrate(distributed=True)")
    if isinstance(data, torch.Tensor):
        raise CalibrationError(f"calibrate: data is one tensor {tuple(data.shape)}; pass an iterable of batches, e.g. "
                               "[x] or a DataLoader (iterating a tensor would feed its rows one at a time)")
    observers = _observers(model)
    _check_prepared(model, observers)
    check_same_model(model, group)
    if dist.get_rank(group) != 0:
        for obs in observers:
            if getattr(obs, "_fxq_synced", False) and not _is_ordered(obs):
                obs.reset()
    with torch.no_grad():
        count, error = _run_local(model, data, max_batches, group, any(map(_is_ordered, observers)), progress)
    try:
        check_same_model(model, group, error=None if error is None else str(error))
    except DistributedError:
        if error is not None:
            raise error from error.__cause__
        raise
    total = torch.tensor([float(count)], device=_device(group))
    dist.all_reduce(total, group=group)
    if not total.item():
        raise CalibrationError("calibration data was empty on every rank: pass at least one batch of representative "
                               "inputs")
    _sync(model, group, step=False, only=lambda o: not _is_ordered(o))
    if all(not o.has_data for o in observers):
        raise CalibrationError(f"after {int(total.item())} batch(es) on all ranks no observer saw a finite value "
                               "(NaN/Inf-only data or empty batches?); check the calibration data")


# ------------------------------------------------------------------------------------------ QAT

@dataclasses.dataclass
class StepSync:
    """The hooks :func:`sync_each_step` installed; :meth:`remove` takes them out."""

    handles: list[Any]

    def remove(self) -> None:
        """Stop syncing after each training forward."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def sync_each_step(model: nn.Module, group: Optional[Any] = None) -> StepSync:
    """Keep the observers of a QAT model identical on every rank, synced after each training forward.

    Install it on the prepared model (before or after wrapping it in ``DistributedDataParallel``). After each
    forward in train mode, every moving-average and min/max observer is all-reduced (MIN / MAX: exactly the
    update one process makes for the global batch, see ``_step_moving``), the fake quantizers' ``scale`` /
    ``zero_point`` are recomputed from them, and LSQ fake quantizers that initialised in this step take their
    initial qparams from the global batch. The forward that just ran used this rank's own qparams; every later
    one uses the global ones. Histogram-based fake quantizers are merged only by :func:`sync_observers`.
    Forwards in eval mode do not sync (so evaluating on one rank alone does not hang): disable the observers
    (``fxquant.disable_observer``) before evaluating, as usual.

    Args:
        model: the prepared QAT model (or the ``DistributedDataParallel`` around it).
        group: the process group (default: the world).

    Returns:
        A :class:`StepSync` whose ``remove()`` stops it.

    Raises:
        DistributedError: no process group, or ranks whose models differ (checked now, once).
    """
    group = _group_of(group, "sync_each_step")
    inner = _unwrap(model)
    check_same_model(inner, group)
    fresh_lsq: list[LearnableFakeQuantize] = []

    def before(module: nn.Module, args: Any) -> None:
        if module.training:
            fresh_lsq[:] = [m for m in module.modules() if isinstance(m, LearnableFakeQuantize) and not m.has_data]

    def after(module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        _sync(module, group, step=True)
        for fq in fresh_lsq:
            if fq.has_data:
                qp = fq.activation_post_process.qparams()
                fq.scale.data.copy_(qp.scale.reshape(-1))
                fq.zero_point.data.copy_(qp.zero_point.reshape(-1).to(fq.zero_point.dtype))

    return StepSync([inner.register_forward_pre_hook(before), inner.register_forward_hook(after)])


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce SUM: the gradient of each rank's input is the all-reduced output gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SyncBatchNormMixin:
    """Batch norm whose training statistics are those of the global batch (all ranks), on CPU and GPU.

    Mean and variance are all-reduced (two differentiable all-reduces: the sum, then the squared deviations);
    the gradient flows through both, as in ``torch.nn.SyncBatchNorm``, which runs on GPUs only. Without a
    process group, in eval mode or with frozen statistics it is the ordinary batch norm.
    """

    group: Optional[Any] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: Any = self
        if not (bn.training and dist.is_available() and dist.is_initialized()) or isinstance(x, fx.Proxy):
            return super().forward(x)  # type: ignore[misc]
        bn._check_input_dim(x)
        group = self.group if self.group is not None else dist.group.WORLD
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])]), group)
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.reshape(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n
        y = centred * torch.rsqrt(var + bn.eps).reshape(shape)
        if bn.affine:
            y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
        if bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.lerp_(mean.detach(), factor)
                bn.running_var.lerp_(var.detach() * (n / (n - 1).clamp(min=1)), factor)
        return y


class SyncBatchNorm1d(_SyncBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with global-batch statistics (see :func:`convert_sync_batchnorm`)."""


class SyncBatchNorm2d(_SyncBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with global-batch statistics (see :func:`convert_sync_batchnorm`)."""


class SyncBatchNorm3d(_SyncBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with global-batch statistics (see :func:`convert_sync_batchnorm`)."""


_SYNC_BN = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d}


def convert_sync_batchnorm(model: nn.Module, group: Optional[Any] = None) -> nn.Module:
    """A copy of a prepared QAT model whose folded batch norms (``ConvBn*``, ``LinearBn*``) sync their statistics.

    In training, each folded batch norm then normalises with the mean and variance of the global batch (all
    ranks) and updates its running statistics with them, as ``torch.nn.SyncBatchNorm`` does (on CPU and GPU,
    gloo or NCCL). ``freeze_bn_stats``, eval mode and ``convert_fx`` work as before. Call it before wrapping
    the model in ``DistributedDataParallel`` and before building the optimizer.

    Args:
        model: the result of ``prepare_qat_fx`` (not modified).
        group: the process group the statistics are reduced over (default: the world, looked up when training).

    Returns:
        The converted copy.
    """
    model = copy.deepcopy(_unwrap(model))
    for m in model.modules():
        if isinstance(m, _BnFold) and type(m.bn) in _SYNC_BN:
            old = m.bn
            new = _SYNC_BN[type(old)](old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
                                      track_running_stats=old.track_running_stats, device=old.running_mean.device,
                                      dtype=old.running_mean.dtype)
            new.load_state_dict(old.state_dict())
            if old.affine:
                new.weight, new.bias = old.weight, old.bias
            new.group = group
            new.train(old.training)
            m.bn = new
    return model
