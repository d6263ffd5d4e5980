"""Hypothesis strategies for property-based tests of quantization: random models, mappings, backends, data.

Every model drawn here is valid by construction: a :class:`Recipe` is a list of ops, each reading earlier
values by index, with every shape known when the op is drawn (so convs get the right ``in_channels``, adds
and muls read two values of one shape, cats agree on the other dimensions, linears follow a flatten or a
global pool). :class:`RandomModel` runs a recipe as an ``nn.Module`` whose ``forward`` torch.fx traces into
chains and DAGs (branches, merges, nested blocks, dead branches) of conv, linear, batch norm, the ReLU family,
add, mul, cat, pooling and reshape / flatten / permute, spelled as modules, functions and methods.

``hypothesis`` is a test dependency only: it is imported when a strategy is built, not when this module is.

Example (in a user's own test file):
    >>> import torch, fxquant
    >>> from hypothesis import given, settings
    >>> from fxquant.testing import quant_cases
    >>> @settings(max_examples=20, deadline=None)
    ... @given(quant_cases())
    ... def test_my_pipeline(case):
    ...     prepared = fxquant.prepare_fx(case.model, case.mapping, (case.example,), backend_config=case.backend)
    ...     fxquant.calibrate(prepared, case.calibration, progress=False)
    ...     assert torch.isfinite(fxquant.convert_fx(prepared)(case.example)).all()
    >>> test_my_pipeline()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.observers import MinMaxObserver, MovingAverageMinMaxObserver
from fxquant.qconfig import QConfig, QConfigMapping, get_default_qconfig

__all__ = ["Op", "Recipe", "RandomModel", "RandomBlock", "QuantCase", "BACKEND_NAMES", "OBJECT_TYPES", "examples",
           "recipes", "models", "backends", "qconfigs", "qconfig_mappings", "calibration_data", "quant_cases"]

#: the built-in backends
BACKEND_NAMES = ("fbgemm", "qnnpack", "x86")

#: a value's shape without the batch dimension: ``(C, H, W)`` (an image) or ``(F,)`` (features)
Shape = tuple[int, ...]

_MAX_CHANNELS = 16


def _hypothesis() -> Any:
    try:
        from hypothesis import strategies
    except ImportError as exc:  # pragma: no cover - hypothesis is a test dependency
        raise ImportError("fxquant.testing builds hypothesis strategies and needs hypothesis, a test dependency: "
                          "pip install hypothesis (or pip install 'fxquant[test]')") from exc
    return strategies


def examples(default: int) -> int:
    """How many examples a property test runs: ``default``, or ``FXQUANT_HYPOTHESIS_EXAMPLES`` when it is set.

    Example:
        >>> from hypothesis import settings
        >>> @settings(max_examples=examples(10))                                       # doctest: +SKIP
        ... def test_something(...): ...
    """
    value = os.environ.get("FXQUANT_HYPOTHESIS_EXAMPLES", "")
    return int(value) if value.strip() else default


# ------------------------------------------------------------------------------------------------- recipes

@dataclasses.dataclass(frozen=True)
class Op:
    """One step of a :class:`Recipe`.

    Attributes:
        kind: ``conv``, ``linear``, ``bn``, ``act``, ``add``, ``mul``, ``cat``, ``pool``, ``flatten``,
            ``reshape``, ``permute``, ``dropout`` or ``block``.
        inputs: indices of the values it reads (0 is the model's input, ``i + 1`` the output of op ``i``).
        args: kind-specific settings, e.g. ``("relu", "method")`` for ``x.relu()``.
        out: the shape it produces (without the batch dimension).
        body: the sub-recipe of a ``block`` (run by a :class:`RandomBlock` submodule).
    """

    kind: str
    inputs: tuple[int, ...]
    args: tuple[Any, ...]
    out: Shape
    body: Optional["Recipe"] = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A model as data: the input shape and the ops; the output is the last op's value."""

    in_shape: Shape
    ops: tuple[Op, ...]

    @property
    def out_shape(self) -> Shape:
        return self.ops[-1].out if self.ops else self.in_shape

    def describe(self, indent: str = "") -> str:
        """The recipe as readable pseudo-code (what hypothesis prints for a failing example)."""
        lines = [f"{indent}v0: input {self.in_shape}"]
        for i, op in enumerate(self.ops):
            args = ", ".join(f"v{j}" for j in op.inputs)
            lines.append(f"{indent}v{i + 1} = {op.kind}{i}({args}; {', '.join(map(str, op.args))}) -> {op.out}")
            if op.body is not None:
                lines.append(op.body.describe(indent + "    "))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Recipe(\n{self.describe('  ')}\n)"


_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh, "hardswish": nn.Hardswish,
                "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}
_ACT_FUNCTIONS = {"relu": F.relu, "relu6": F.relu6, "hardtanh": F.hardtanh, "hardswish": F.hardswish,
                  "sigmoid": torch.sigmoid, "tanh": torch.tanh, "leaky_relu": F.leaky_relu}
_ACT_FORMS = {"relu": ("module", "function", "torch", "method"), "relu6": ("module", "function"),
              "hardtanh": ("module", "function"), "hardswish": ("module", "function"),
              "sigmoid": ("module", "function", "method"), "tanh": ("module", "function", "method"),
              "leaky_relu": ("module", "function")}
_POOL_MODULES = {"max": lambda: nn.MaxPool2d(2), "avg": lambda: nn.AvgPool2d(2),
                 "adaptive": lambda: nn.AdaptiveAvgPool2d(1)}
_POOL_FUNCTIONS = {"max": lambda x: F.max_pool2d(x, 2), "avg": lambda x: F.avg_pool2d(x, 2),
                   "adaptive": lambda x: F.adaptive_avg_pool2d(x, 1)}


def _build_module(op: Op, seed: int) -> Optional[nn.Module]:
    """The module an op owns (``None`` for ops spelled as functions or methods)."""
    kind, args = op.kind, op.args
    if kind == "conv":
        cin, cout, k, stride, groups, bias = args
        return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)
    if kind == "linear":
        fin, fout, bias = args
        return nn.Linear(fin, fout, bias=bias)
    if kind == "bn":
        return nn.BatchNorm2d(op.out[0]) if len(op.out) == 3 else nn.BatchNorm1d(op.out[0])
    if kind == "act" and args[1] == "module":
        return _ACT_MODULES[args[0]]()
    if kind == "pool" and args[1] == "module":
        return _POOL_MODULES[args[0]]()
    if kind == "flatten" and args[0] == "module":
        return nn.Flatten()
    if kind == "dropout":
        return nn.Dropout(0.5) if args[0] == "dropout" else nn.Identity()
    if kind == "block":
        return RandomBlock(op.body, seed)
    return None


def _init_(model: nn.Module, seed: int) -> None:
    """Deterministic weights (scaled by 1/sqrt(fan_in), so activations stay O(1)) and non-trivial BN statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))


class RandomModel(nn.Module):
    """Runs a :class:`Recipe`; its modules are called ``{kind}{index}`` (``conv0``, ``block3.bn1``, ...).

    Args:
        recipe: the ops.
        seed: seeds the weights and batch norm statistics (the model is returned in eval mode).

    Example:
        >>> r = Recipe((3, 4, 4), (Op("conv", (0,), (3, 8, 3, 1, 1, True), (8, 4, 4)),
        ...                        Op("act", (1,), ("relu", "method"), (8, 4, 4))))
        >>> RandomModel(r)(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    _fxquant_traceable = True  # fxquant's tracer keeps its own modules as leaves unless they say so

    def __init__(self, recipe: Recipe, seed: int = 0) -> None:
        super().__init__()
        self.recipe = recipe
        for i, op in enumerate(recipe.ops):
            module = _build_module(op, seed + i + 1)
            if module is not None:
                self.add_module(f"{op.kind}{i}", module)
        _init_(self, seed)
        self.eval()

    def example(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """A standard-normal input batch of the recipe's input shape."""
        return torch.randn((batch,) + self.recipe.in_shape, generator=torch.Generator().manual_seed(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for i, op in enumerate(self.recipe.ops):
            values.append(self._run_op(i, op, [values[j] for j in op.inputs]))
        return values[-1]

    def _run_op(self, i: int, op: Op, xs: list) -> Any:  # noqa: C901 - one branch per op kind, all tiny
        kind, args, x = op.kind, op.args, xs[0]
        module: Callable[..., Any] = getattr(self, f"{kind}{i}", None)  # type: ignore[assignment]
        if kind in ("conv", "linear", "bn", "block", "dropout"):
            return module(x)
        if kind == "act":
            name, form = args
            if form == "module":
                return module(x)
            if form == "method":
                return getattr(x, name)()
            return (torch.relu if name == "relu" and form == "torch" else _ACT_FUNCTIONS[name])(x)
        if kind in ("add", "mul"):
            if args[0] == "operator":
                return (operator.add if kind == "add" else operator.mul)(x, xs[1])
            return (torch.add if kind == "add" else torch.mul)(x, xs[1])
        if kind == "cat":
            return torch.cat([x, xs[1]], 1)
        if kind == "pool":
            return module(x) if args[1] == "module" else _POOL_FUNCTIONS[args[0]](x)
        if kind == "flatten":
            return module(x) if args[0] == "module" else (x.flatten(1) if args[0] == "method" else torch.flatten(x, 1))
        if kind == "reshape":
            return x.reshape((-1,) + op.out)
        if kind == "permute":
            return x.permute(0, 1, 3, 2)
        raise ValueError(f"unknown op kind {kind!r}")


class RandomBlock(RandomModel):
    """A :class:`RandomModel` used as a submodule (its own class, so object-type qconfig settings can name it)."""


# ------------------------------------------------------------------------------------------- op drawing

#: op kinds drawn for an image / a feature vector, repeated to weigh them (mostly convs and linears, as in models)
_IMAGE_KINDS = ("conv", "act", "conv", "bn", "add", "pool", "conv", "act", "mul", "cat", "conv", "pool", "flatten",
                "reshape", "permute", "dropout", "block")
_ACT_NAMES = ("relu", "hardswish", "relu", "relu6", "sigmoid", "relu", "hardtanh", "tanh", "leaky_relu")
_FOLLOWERS = ((), ("bn",), ("act",), ("bn", "act"), ())
_FEATURE_KINDS = ("linear", "act", "linear", "bn", "add", "mul", "cat", "linear", "act", "dropout", "block")


def _draw_op(draw: Any, st: Any, shapes: list[Shape], depth: int, max_ops: int) -> Op:
    """One op reading existing values (``shapes``), shape-consistent by construction."""
    n = len(shapes)
    src = draw(st.one_of(st.just(n - 1), st.integers(0, n - 1)))  # mostly chains, sometimes branches
    shape = shapes[src]
    image = len(shape) == 3
    kinds = _IMAGE_KINDS if image else _FEATURE_KINDS
    kind = draw(st.sampled_from(kinds if depth > 0 else [k for k in kinds if k != "block"]))
    if kind == "conv":
        cin = shape[0]
        depthwise = draw(st.booleans()) and cin > 1
        cout = cin if depthwise else draw(st.integers(1, 8))
        k, stride = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 1, 2]))
        out = (cout,) + tuple((s + 2 * (k // 2) - k) // stride + 1 for s in shape[1:])
        return Op(kind, (src,), (cin, cout, k, stride, cin if depthwise else 1, draw(st.booleans())), out)
    if kind == "linear":
        fout = draw(st.integers(1, 8))
        return Op(kind, (src,), (shape[0], fout, draw(st.booleans())), (fout,))
    if kind == "act":
        name = draw(st.sampled_from(_ACT_NAMES))
        return Op(kind, (src,), (name, draw(st.sampled_from(_ACT_FORMS[name]))), shape)
    if kind in ("add", "mul"):
        same = [i for i, s in enumerate(shapes) if s == shape]
        return Op(kind, (src, draw(st.sampled_from(same))), (draw(st.sampled_from(["operator", "torch"])),), shape)
    if kind == "cat":
        fits = [i for i, s in enumerate(shapes) if len(s) == len(shape) and s[1:] == shape[1:]
                and s[0] + shape[0] <= _MAX_CHANNELS]
        if not fits:
            return Op("act", (src,), ("relu", "module"), shape)
        other = draw(st.sampled_from(fits))
        return Op(kind, (src, other), (), (shape[0] + shapes[other][0],) + shape[1:])
    if kind == "pool":
        how = draw(st.sampled_from(["max", "avg", "adaptive"]))
        if how != "adaptive" and min(shape[1:]) < 2:
            how = "adaptive"
        out = (shape[0], 1, 1) if how == "adaptive" else (shape[0], shape[1] // 2, shape[2] // 2)
        return Op(kind, (src,), (how, draw(st.sampled_from(["module", "function"]))), out)
    if kind == "flatten":
        return Op(kind, (src,), (draw(st.sampled_from(["module", "function", "method"])),), (math.prod(shape),))
    if kind == "reshape":
        flat = draw(st.booleans())
        return Op(kind, (src,), ("features" if flat else "swap",),
                  (math.prod(shape),) if flat else (shape[0], shape[2], shape[1]))
    if kind == "permute":
        return Op(kind, (src,), (), (shape[0], shape[2], shape[1]))
    if kind == "dropout":
        return Op(kind, (src,), (draw(st.sampled_from(["dropout", "identity"])),), shape)
    if kind == "bn":
        return Op(kind, (src,), (), shape)
    body = _draw_recipe(draw, st, shape, depth - 1, max(1, max_ops // 2))
    return Op("block", (src,), (), body.out_shape, body)


def _draw_recipe(draw: Any, st: Any, in_shape: Shape, depth: int, max_ops: int) -> Recipe:
    shapes: list[Shape] = [in_shape]
    ops: list[Op] = []
    for _ in range(draw(st.integers(1, max_ops))):
        op = _draw_op(draw, st, shapes, depth, max_ops)
        ops.append(op)
        shapes.append(op.out)
        if op.kind in ("conv", "linear"):  # the patterns fusion looks for: conv/linear (+ bn) (+ relu)
            for follow in draw(st.sampled_from(_FOLLOWERS)):
                ops.append(Op(follow, (len(shapes) - 1,), ("relu", draw(st.sampled_from(_ACT_FORMS["relu"])))
                              if follow == "act" else (), op.out))
                shapes.append(op.out)
    return Recipe(in_shape, tuple(ops))


def recipes(max_ops: int = 6, max_depth: int = 1, image: Optional[bool] = None) -> Any:
    """A strategy of :class:`Recipe` s: 1 to ``max_ops`` ops, blocks nested up to ``max_depth`` deep.

    Args:
        max_ops: the most ops at the top level (a block holds up to half as many).
        max_depth: how deep blocks nest (0: no blocks).
        image: ``True``: inputs ``(C, H, W)``; ``False``: features ``(F,)``; ``None``: either.

    Example:
        >>> recipes(max_ops=3).example().ops                                           # doctest: +SKIP
    """
    st = _hypothesis()
    sizes = st.sampled_from([4, 5, 6, 8, 1, 2, 3])  # mostly room for a pool or a strided conv
    image_shapes = st.tuples(st.integers(1, 4), sizes, sizes)
    feature_shapes = st.tuples(st.integers(1, 8))
    kinds = st.sampled_from([True, True, True, False]) if image is None else st.just(image)

    @st.composite
    def draw_recipe(draw: Any) -> Recipe:
        return _draw_recipe(draw, st, draw(image_shapes if draw(kinds) else feature_shapes), max_depth, max_ops)

    return draw_recipe()


def models(max_ops: int = 6, max_depth: int = 1, image: Optional[bool] = None) -> Any:
    """A strategy of :class:`RandomModel` s in eval mode, seeded (see :func:`recipes` for the arguments).

    Example:
        >>> model = models().example()                                                 # doctest: +SKIP
        >>> model(model.example()).shape                                               # doctest: +SKIP
    """
    st = _hypothesis()
    return st.builds(RandomModel, recipes(max_ops, max_depth, image), st.integers(0, 2 ** 16))


# --------------------------------------------------------------------------------- backends and qconfigs

def backends(names: Sequence[str] = BACKEND_NAMES) -> Any:
    """A strategy of backend names (``"fbgemm"``, ``"qnnpack"``, ``"x86"``)."""
    return _hypothesis().sampled_from(list(names))


def _qconfig_choices(backend: str) -> list[QConfig]:
    """QConfigs the backend's table accepts: its default, MinMax / moving-average activations, per-tensor weights
    (each keeps the default's grid and ``eps``, which carry the table's limits)."""
    default = get_default_qconfig(backend)
    act, weight = default.activation.kwargs, default.weight.kwargs  # type: ignore[union-attr]
    per_tensor = MinMaxObserver.with_args(**{**weight, "qscheme": torch.per_tensor_symmetric})
    return [default,
            QConfig(MinMaxObserver.with_args(**act), default.weight),
            QConfig(MovingAverageMinMaxObserver.with_args(averaging_constant=0.5, **act), per_tensor)]


def qconfigs(backend: str, none: bool = True) -> Any:
    """A strategy of QConfigs valid on ``backend`` (and ``None``, "stay float", if ``none``)."""
    st = _hypothesis()
    choices = st.sampled_from(_qconfig_choices(backend))
    return st.one_of(st.none(), choices) if none else choices


#: object types a random mapping may name: module classes, functions and method names the models use
OBJECT_TYPES: tuple[Any, ...] = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Hardswish,
                                 RandomBlock, operator.add, operator.mul, torch.add, torch.cat, F.relu,
                                 torch.flatten, "relu", "reshape", "permute")


def qconfig_mappings(backend: str, module_names: Sequence[str] = (), object_types: Sequence[Any] = OBJECT_TYPES,
                     max_settings: int = 3) -> Any:
    """A strategy of QConfigMappings: a global setting (a QConfig, ``None`` or unset), and up to
    ``max_settings`` object-type, module-name and regex settings each, some ``None`` (stay float).

    Args:
        backend: the backend whose table every QConfig must satisfy.
        module_names: qualified names of the model's modules (names and regexes are drawn from them; a few
            names and regexes that match nothing are mixed in).
        object_types: the object types to draw from.
        max_settings: the most settings of each kind.

    Example:
        >>> qconfig_mappings("qnnpack", ["conv0", "block1.conv0"]).example()            # doctest: +SKIP
    """
    st = _hypothesis()
    qc = qconfigs(backend)
    names = sorted(set(module_names)) or ["missing"]
    regexes = sorted({"conv.*", r".*\.conv0", "block", ".*", "nothing_here.*"} |
                     {n.split(".")[0] + r"\..*" for n in names if "." in n})

    @st.composite
    def draw_mapping(draw: Any) -> QConfigMapping:
        mapping = QConfigMapping()
        if draw(st.integers(0, 3)):  # mostly set
            mapping.set_global(draw(qc))
        for t in draw(st.lists(st.sampled_from(list(object_types)), max_size=max_settings, unique_by=repr)):
            mapping.set_object_type(t, draw(qc))
        for r in draw(st.lists(st.sampled_from(regexes), max_size=max_settings, unique=True)):
            mapping.set_module_name_regex(r, draw(qc))
        for n in draw(st.lists(st.sampled_from(names), max_size=max_settings, unique=True)):
            mapping.set_module_name(n, draw(qc))
        return mapping

    return draw_mapping()


# -------------------------------------------------------------------------------------- calibration data

def calibration_data(shape: Shape, batch: int = 2, max_batches: int = 3, outliers: bool = True) -> Any:
    """A strategy of calibration batches (a list of float32 tensors of shape ``(batch, *shape)``).

    Each list has its own scale (0.1 to 10) and offset; with ``outliers``, some lists put a few values 10 to
    10,000 times larger into one batch, or include a constant batch. All values are finite.

    Example:
        >>> batches = calibration_data((3, 8, 8)).example()                              # doctest: +SKIP
    """
    st = _hypothesis()

    @st.composite
    def draw_batches(draw: Any) -> list[torch.Tensor]:
        n = draw(st.integers(1, max_batches))
        scale = draw(st.sampled_from([0.1, 0.5, 1.0, 2.0, 10.0]))
        offset = draw(st.sampled_from([0.0, 0.0, 0.5, -1.0]))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
        out = [scale * torch.randn((batch,) + tuple(shape), generator=gen) + offset for _ in range(n)]
        kind = draw(st.sampled_from(["none", "spike", "constant"])) if outliers else "none"
        if kind == "spike":
            flat = out[-1].view(-1)
            idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 100),), generator=gen)
            flat[idx] *= draw(st.sampled_from([10.0, 100.0, 1e4]))
        elif kind == "constant":
            out.append(torch.full_like(out[0], offset + scale))
        return out

    return draw_batches()


@dataclasses.dataclass
class QuantCase:
    """Everything one quantization test needs, drawn together (see :func:`quant_cases`).

    Attributes:
        backend: the backend name.
        model: the float model (eval mode).
        mapping: the QConfigMapping (valid on ``backend``).
        example: the example input (``prepare_fx``'s ``example_inputs=(example,)``).
        calibration: the calibration batches.
        inputs: a standard-normal test batch (not seen in calibration).
    """

    backend: str
    model: RandomModel
    mapping: QConfigMapping
    example: torch.Tensor
    calibration: list[torch.Tensor]
    inputs: torch.Tensor

    def __repr__(self) -> str:
        data = ", ".join(f"{tuple(b.shape)} absmax={float(b.abs().max()):.3g}" for b in self.calibration)
        return (f"QuantCase(backend={self.backend!r},\nmodel={self.model.recipe!r},\nmapping={self.mapping!r},\n"
                f"calibration=[{data}])")


def quant_cases(backend_names: Sequence[str] = BACKEND_NAMES, max_ops: int = 6, max_depth: int = 1,
                mapping: str = "random") -> Any:
    """A strategy of :class:`QuantCase` s: a backend, a model, a mapping for it and data.

    Args:
        backend_names: the backends to draw from.
        max_ops, max_depth: see :func:`recipes`.
        mapping: ``"random"`` (:func:`qconfig_mappings` over the model's module names) or ``"default"``
            (``get_default_qconfig_mapping(backend)``).

    Example:
        >>> case = quant_cases(["qnnpack"]).example()                                    # doctest: +SKIP
    """
    st = _hypothesis()
    from fxquant.qconfig import get_default_qconfig_mapping

    @st.composite
    def draw_case(draw: Any) -> QuantCase:
        backend = draw(backends(backend_names))
        model = draw(models(max_ops, max_depth))
        names = [n for n, _ in model.named_modules() if n]
        qmap = (draw(qconfig_mappings(backend, names)) if mapping == "random"
                else get_default_qconfig_mapping(backend))
        calibration = draw(calibration_data(model.recipe.in_shape))
        seed = draw(st.integers(0, 2 ** 16))
        return QuantCase(backend, model, qmap, model.example(2, seed), calibration, model.example(2, seed + 1))

    return draw_case()
