"""QConfig / QConfigMapping: precedence, name inheritance, regex order, dict round trip, torch.ao parity,
backend defaults."""

from __future__ import annotations

import collections
import dataclasses
import functools
import operator
import re
import warnings
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fxquant.qconfig import QConfig, QConfigMapping

# --------------------------------------------------------------------------------------------- helpers


def tagged(tag: int) -> QConfig:
    """A QConfig told apart from the others by identity (its factories are distinct partials)."""
    return QConfig(activation=functools.partial(nn.Identity, tag=tag), weight=None)


def tag_of(qc: Optional[QConfig]) -> Optional[int]:
    return None if qc is None else qc.activation.keywords["tag"]


class SubA(nn.Module):
    pass


class SubB(nn.Module):
    pass


LEVELS = ["global", "object_type", "regex", "module_name", "order"]


def set_level(m: QConfigMapping, level: str, qc: QConfig) -> None:
    """Set ``qc`` at ``level`` so that it applies to the query in :data:`QUERIES`."""
    if level == "global":
        m.set_global(qc)
    elif level == "object_type":
        m.set_object_type(nn.Linear, qc)
        m.set_object_type(F.linear, qc)
    elif level == "regex":
        m.set_module_name_regex(r"a\.", qc)
    elif level == "module_name":
        m.set_module_name("a", qc)  # an ancestor: still beats regex and object type
    elif level == "order":
        m.set_module_name_object_type_order("a", nn.Linear, 1, qc)  # call_module a.b: counted in parent "a"
        m.set_module_name_object_type_order("a.b", F.linear, 1, qc)  # call_function inside a.b


#: (module_name, object_type, order_index) of a call_module node and of a call_function node
QUERIES = [("a.b", nn.Linear, 1), ("a.b", F.linear, 1)]

# ------------------------------------------------------------------------------------------ precedence


@pytest.mark.parametrize("low,high", [(lo, hi) for i, lo in enumerate(LEVELS) for hi in LEVELS[i + 1:]])
@pytest.mark.parametrize("high_first", [False, True])
@pytest.mark.parametrize("query", QUERIES, ids=["call_module", "call_function"])
def test_precedence_every_pair(low: str, high: str, high_first: bool, query: tuple) -> None:
    m = QConfigMapping()
    order = [(high, tagged(2)), (low, tagged(1))] if high_first else [(low, tagged(1)), (high, tagged(2))]
    for level, qc in order:
        set_level(m, level, qc)
    assert tag_of(m.qconfig_for(*query)) == 2
    # and the lower level applies on its own
    only_low = QConfigMapping()
    set_level(only_low, low, tagged(1))
    assert tag_of(only_low.qconfig_for(*query)) == 1


@pytest.mark.parametrize("level", LEVELS)
def test_none_is_a_setting_not_an_absence(level: str) -> None:
    m = QConfigMapping()
    for lower in LEVELS[:LEVELS.index(level)]:
        set_level(m, lower, tagged(1))
    if level == "global":
        m.set_global(None)
    else:
        set_level(m, level, None)  # type: ignore[arg-type]
    assert m.qconfig_for("a.b", nn.Linear, 1) is None


def test_empty_mapping_leaves_everything_float() -> None:
    assert QConfigMapping().qconfig_for("x", nn.Conv2d, 0) is None


def test_module_name_inherits_to_submodules_nearest_ancestor_wins() -> None:
    m = (QConfigMapping().set_global(tagged(0))
         .set_module_name("a", tagged(1))
         .set_module_name("a.b", tagged(2))
         .set_module_name("a.b.c.d", tagged(4)))
    expect = {"a": 1, "a.x": 1, "a.b": 2, "a.b.c": 2, "a.b.c.d": 4, "a.b.c.d.e": 4, "a.bc": 1,
              "ab": 0, "b": 0, "": 0, "x.a": 0, "x.a.b": 0}
    for name, tag in expect.items():
        assert tag_of(m.qconfig_for(name, nn.Linear)) == tag, name


def test_empty_module_name_never_applies_like_torch_ao() -> None:
    m = QConfigMapping().set_global(tagged(0)).set_module_name("", tagged(1))
    assert tag_of(m.qconfig_for("", operator.add)) == 0
    assert tag_of(m.qconfig_for("fc", nn.Linear)) == 0


def test_module_name_beats_a_more_specific_regex() -> None:
    m = QConfigMapping().set_module_name("a", tagged(1)).set_module_name_regex(r"a\.b\.c$", tagged(2))
    assert tag_of(m.qconfig_for("a.b.c", nn.Linear)) == 1


def test_regex_first_registered_wins_and_keeps_its_place() -> None:
    m = (QConfigMapping()
         .set_module_name_regex(r"foo.*bar.*conv[0-9]+", tagged(1))
         .set_module_name_regex(r"foo.*bar.*", tagged(2))
         .set_module_name_regex(r"foo.*", tagged(3)))
    assert tag_of(m.qconfig_for("foo.bar.conv0", nn.Conv2d)) == 1
    assert tag_of(m.qconfig_for("foo.bar.linear", nn.Linear)) == 2
    assert tag_of(m.qconfig_for("foo.baz.relu", nn.ReLU)) == 3
    m.set_module_name_regex(r"foo.*", tagged(4))  # re-registering replaces but keeps position
    assert list(m.module_name_regex_qconfigs) == [r"foo.*bar.*conv[0-9]+", r"foo.*bar.*", r"foo.*"]
    assert tag_of(m.qconfig_for("foo.bar.conv0", nn.Conv2d)) == 1
    assert tag_of(m.qconfig_for("foo.baz", nn.Conv2d)) == 4


def test_regex_is_anchored_at_the_start_only() -> None:
    m = QConfigMapping().set_module_name_regex("conv", tagged(1))
    assert tag_of(m.qconfig_for("conv1", nn.Conv2d)) == 1
    assert tag_of(m.qconfig_for("conv.sub", nn.Conv2d)) == 1
    assert m.qconfig_for("block.conv", nn.Conv2d) is None


def test_object_type_is_exact_not_by_subclass() -> None:
    class MyLinear(nn.Linear):
        pass

    m = QConfigMapping().set_object_type(nn.Linear, tagged(1))
    assert m.qconfig_for("fc", MyLinear) is None
    assert tag_of(m.qconfig_for("fc", nn.Linear)) == 1


def test_order_counts_call_modules_in_the_parent_and_functions_in_their_module() -> None:
    m = (QConfigMapping().set_global(tagged(0))
         .set_module_name_object_type_order("blk", nn.Linear, 0, tagged(1))
         .set_module_name_object_type_order("blk", operator.add, 2, tagged(2)))
    assert tag_of(m.qconfig_for("blk.fc1", nn.Linear, 0)) == 1      # first Linear called by blk
    assert tag_of(m.qconfig_for("blk.fc2", nn.Linear, 1)) == 0
    assert tag_of(m.qconfig_for("blk", nn.Linear, 0)) == 0          # blk itself is called by the root
    assert tag_of(m.qconfig_for("blk", operator.add, 2)) == 2       # third add inside blk.forward
    assert tag_of(m.qconfig_for("blk", operator.add, 1)) == 0
    assert tag_of(m.qconfig_for("blk", operator.add, None)) == 0    # no index: order level skipped
    assert tag_of(m.qconfig_for("blk.sub", operator.add, 2)) == 0   # exact module, no inheritance


def test_scope_type_overrides_the_function_type() -> None:
    m = (QConfigMapping().set_object_type(operator.add, tagged(1)).set_object_type(SubA, tagged(2))
         .set_object_type("reshape", tagged(3)))
    assert tag_of(m.qconfig_for("s", operator.add, 0)) == 1
    assert tag_of(m.qconfig_for("s", operator.add, 0, scope_type=SubA)) == 2
    assert tag_of(m.qconfig_for("s", operator.add, 0, scope_type=SubB)) == 1
    assert tag_of(m.qconfig_for("s", "reshape", None, scope_type=SubA)) == 2
    assert tag_of(m.qconfig_for("s", "reshape", None, scope_type=SubB)) == 3
    m.set_module_name_regex("s", tagged(4))
    assert tag_of(m.qconfig_for("s", operator.add, 0, scope_type=SubA)) == 4


# ------------------------------------------------------------------------- property: most specific wins

_NAMES = st.lists(st.sampled_from(["a", "b", "c"]), max_size=3).map(".".join)
_TYPES = [nn.Linear, nn.Conv2d, SubA, SubB, F.relu, operator.add, "reshape"]
_REGEXES = ["a", r"a\.b", r".*c$", "b.*", r"a\.b\.c", ".*", "c", r"b\.a"]
_TAGS = st.integers(0, 5).map(lambda i: None if i == 5 else tagged(i))

_SETTINGS = st.one_of(
    st.tuples(st.just("global"), _TAGS),
    st.tuples(st.just("object_type"), st.sampled_from(_TYPES), _TAGS),
    st.tuples(st.just("regex"), st.sampled_from(_REGEXES), _TAGS),
    st.tuples(st.just("module_name"), _NAMES, _TAGS),
    st.tuples(st.just("order"), _NAMES, st.sampled_from(_TYPES), st.integers(0, 2), _TAGS),
)


def build(settings_list: list[tuple]) -> QConfigMapping:
    m = QConfigMapping()
    for kind, *args in settings_list:
        {"global": m.set_global, "object_type": m.set_object_type, "regex": m.set_module_name_regex,
         "module_name": m.set_module_name, "order": m.set_module_name_object_type_order}[kind](*args)
    return m


def most_specific(settings_list: list[tuple], name: str, otype: Any, index: Optional[int],
                  scope_type: Optional[type]) -> Optional[QConfig]:
    """Rank every setting that applies by specificity and take the highest (the spec, stated directly)."""
    latest: dict[tuple, Any] = {("global",): None}
    regex_pos: dict[str, int] = {}
    for kind, *args in settings_list:
        latest[(kind, *args[:-1])] = args[-1]
        if kind == "regex":
            regex_pos.setdefault(args[0], len(regex_pos))
    ranked = []
    for (kind, *key), qc in latest.items():
        if kind == "global":
            ranked.append(((0, 0), qc))
        elif kind == "object_type" and key[0] is otype:
            ranked.append(((1, 0), qc))
        elif kind == "object_type" and scope_type is not None and key[0] is scope_type:
            ranked.append(((1, 1), qc))
        elif kind == "regex" and re.match(key[0], name):
            ranked.append(((2, -regex_pos[key[0]]), qc))
        elif kind == "module_name" and key[0] and (name == key[0] or name.startswith(key[0] + ".")):
            ranked.append(((3, key[0].count(".")), qc))
        elif kind == "order" and index is not None and key[1] is otype and key[2] == index:
            scope = name.rsplit(".", 1)[0] if (isinstance(otype, type) and "." in name) else (
                "" if isinstance(otype, type) else name)
            if key[0] == scope:
                ranked.append(((4, 0), qc))
    return max(ranked, key=lambda r: r[0])[1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_SETTINGS, max_size=12), _NAMES, st.sampled_from(_TYPES), st.one_of(st.none(), st.integers(0, 2)),
       st.sampled_from([None, SubA, SubB]))
def test_most_specific_setting_always_wins(settings_list, name, otype, index, scope_type) -> None:
    m = build(settings_list)
    if isinstance(otype, type):
        scope_type = None  # call_module nodes have no separate scope type
    got = m.qconfig_for(name, otype, index, scope_type=scope_type)
    assert got is most_specific(settings_list, name, otype, index, scope_type)


@settings(max_examples=100, deadline=None)
@given(st.lists(_SETTINGS, max_size=12), _NAMES, st.sampled_from(_TYPES), st.one_of(st.none(), st.integers(0, 2)))
def test_dict_round_trip(settings_list, name, otype, index) -> None:
    m = build(settings_list)
    d = m.to_dict()
    again = QConfigMapping.from_dict(d)
    assert again == m and again.to_dict() == d
    assert list(again.module_name_regex_qconfigs) == list(m.module_name_regex_qconfigs)
    assert again.qconfig_for(name, otype, index) is m.qconfig_for(name, otype, index)


def test_to_dict_uses_torch_ao_format() -> None:
    ao_mapping = _ao().QConfigMapping
    qc1, qc2 = tagged(1), tagged(2)
    ours, theirs = QConfigMapping(), ao_mapping()
    for m in (ours, theirs):
        (m.set_global(qc1).set_object_type(nn.Linear, qc2).set_object_type("reshape", None)
         .set_module_name_regex("x.*", qc2).set_module_name("fc", None)
         .set_module_name_object_type_order("", F.linear, 0, qc1))
    assert ours.to_dict() == theirs.to_dict()
    assert QConfigMapping.from_dict(theirs.to_dict()) == ours


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="module_name_regex"):
        QConfigMapping.from_dict({"module_names": [("fc", None)]})


def test_names_and_repr() -> None:
    m = (QConfigMapping().set_global(tagged(0)).set_module_name("a.b", None).set_module_name_regex("c.*", None)
         .set_module_name_object_type_order("d", nn.Linear, 0, None).set_object_type(nn.Conv2d, None))
    assert m.names() == {"a.b", "c.*", "d"}
    text = repr(m)
    for piece in ("QConfigMapping(", "a.b", "c.*", "torch.nn.modules.linear.Linear", "Conv2d"):
        assert piece in text


def test_setters_chain_and_validate() -> None:
    m = QConfigMapping()
    assert m.set_global(None) is m and m.set_object_type(nn.Linear, None) is m
    assert m.set_module_name_regex("x", None) is m and m.set_module_name("x", None) is m
    assert m.set_module_name_object_type_order("x", nn.Linear, 0, None) is m
    with pytest.raises(TypeError, match="fxquant.QConfig"):
        m.set_global((nn.Identity, nn.Identity))
    with pytest.raises(ValueError, match="regular expression"):
        m.set_module_name_regex("layer[", None)
    with pytest.raises(ValueError, match="index"):
        m.set_module_name_object_type_order("x", nn.Linear, -1, None)
    with pytest.raises(TypeError, match="module name"):
        m.set_module_name(nn.Linear, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- QConfig


def test_qconfig_construction_like_torch_ao() -> None:
    a, w = functools.partial(nn.Identity), functools.partial(nn.Identity)
    assert QConfig(a, w) == QConfig(activation=a, weight=w) == QConfig(a, weight=w)
    qc = QConfig(a, w)
    assert qc.activation is a and qc.weight is w
    act, weight = qc
    assert (act, weight) == (a, w)
    assert QConfig(activation=a, weight=None).weight is None
    assert qc.replace(weight=None) == QConfig(a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        qc.weight = None  # type: ignore[misc]


def test_qconfig_rejects_observer_instances_with_a_hint() -> None:
    with pytest.raises(TypeError, match=r"Identity\.with_args"):
        QConfig(activation=nn.Identity(), weight=None)
    with pytest.raises(TypeError, match="weight"):
        QConfig(activation=nn.Identity, weight=nn.Identity())
    with pytest.raises(TypeError, match="with_args"):
        QConfig(activation="minmax", weight=None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ torch.ao cross-check


def _ao() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.quantization as ao
        import torch.ao.quantization.fx.qconfig_mapping_utils  # noqa: F401
        import torch.ao.quantization.fx.tracer  # noqa: F401
    return ao


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x)) + 1
        x = torch.add(self.fc2(x), 1) + x
        return torch.sigmoid(x).reshape(-1, 4)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.fc = Block(), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(x)) + self.block(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = Block(), Inner(), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(self.b(self.a(x)))
        return torch.sigmoid(x + 1).reshape(-1, 4) + self.fc(x)


@functools.lru_cache(maxsize=None)
def _traced_net() -> tuple[Net, torch.fx.Graph, dict]:
    ao = _ao()
    net = Net()
    tracer = ao.fx.tracer.QuantizationTracer([], [])
    graph = tracer.trace(net)
    return net, graph, dict(tracer.node_name_to_scope)


def _ours_per_node(m: QConfigMapping, net: nn.Module, graph: torch.fx.Graph, scopes: dict) -> dict:
    """What a prepare pass does with :meth:`QConfigMapping.qconfig_for`: count calls per scope, query."""
    modules = dict(net.named_modules(remove_duplicate=False))
    seen: collections.Counter = collections.Counter()
    out = {}
    for node in graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        path, scope_type = scopes[node.name]
        if node.op == "call_module":
            mtype = type(modules[node.target])
            key = (path.rsplit(".", 1)[0] if "." in path else "", mtype)
            out[node.name] = m.qconfig_for(node.target, mtype, seen[key])
        elif node.op == "call_function":
            key = (path, node.target)
            out[node.name] = m.qconfig_for(path, node.target, seen[key], scope_type=scope_type)
        else:  # torch.ao does not count call_method nodes
            out[node.name] = m.qconfig_for(path, node.target, None, scope_type=scope_type)
            continue
        seen[key] += 1
    return out


_AO_TYPES = [nn.Linear, nn.Hardswish, Block, Inner, Net, operator.add, torch.add, torch.sigmoid, "reshape"]
_AO_NAMES = ["a", "a.fc1", "a.fc2", "a.act", "b", "b.block", "b.block.fc1", "b.fc", "fc", "", "b.nothing"]
_AO_REGEXES = ["a", r"b\.block", r".*fc", r".*\.fc1$", "b", ".*", r"a\.f"]
_AO_SCOPES = ["", "a", "b", "b.block"]
_AO_SETTINGS = st.one_of(
    st.tuples(st.just("global"), _TAGS),
    st.tuples(st.just("object_type"), st.sampled_from(_AO_TYPES), _TAGS),
    st.tuples(st.just("regex"), st.sampled_from(_AO_REGEXES), _TAGS),
    st.tuples(st.just("module_name"), st.sampled_from(_AO_NAMES), _TAGS),
    st.tuples(st.just("order"), st.sampled_from(_AO_SCOPES), st.sampled_from(_AO_TYPES), st.integers(0, 2), _TAGS),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_AO_SETTINGS, min_size=1, max_size=10))
def test_same_choice_as_torch_ao_on_a_traced_model(settings_list) -> None:
    """torch.ao's own resolution (``_generate_node_name_to_qconfig``) and ours pick the same setting per node.

    torch.ao gets namedtuple tags as its qconfigs (its helper passes anything without QConfig's
    ``_fields`` through untouched), ours gets the corresponding fxquant QConfigs.
    """
    ao = _ao()
    net, graph, scopes = _traced_net()
    Tag = collections.namedtuple("Tag", ["tag"])
    ao_settings = [(*s[:-1], None if s[-1] is None else Tag(tag_of(s[-1]))) for s in settings_list]
    theirs = _build_ao(ao.QConfigMapping(), ao_settings)
    ours = build(settings_list)
    modules = dict(net.named_modules(remove_duplicate=False))
    ao_choice = ao.fx.qconfig_mapping_utils._generate_node_name_to_qconfig(net, modules, graph, theirs, scopes)
    our_choice = _ours_per_node(ours, net, graph, scopes)
    assert set(our_choice) <= set(ao_choice)
    for name, qc in our_choice.items():
        ao_qc = ao_choice[name]
        assert tag_of(qc) == (None if ao_qc is None else ao_qc.tag), name


def _build_ao(m: Any, settings_list: list[tuple]) -> Any:
    for kind, *args in settings_list:
        {"global": m.set_global, "object_type": m.set_object_type, "regex": m.set_module_name_regex,
         "module_name": m.set_module_name, "order": m.set_module_name_object_type_order}[kind](*args)
    return m


def test_cross_check_model_exercises_every_node_kind() -> None:
    _, graph, scopes = _traced_net()
    ops = collections.Counter(n.op for n in graph.nodes)
    assert ops["call_module"] >= 8 and ops["call_function"] >= 6 and ops["call_method"] >= 3
    assert {path for path, _ in scopes.values()} >= {"", "a", "b", "b.block"}


# ---------------------------------------------------------------------------------------- defaults

import pickle  # noqa: E402

from hypothesis.extra.numpy import arrays  # noqa: E402  (kept local to the defaults section)

from fxquant.backends import get_backend_config  # noqa: E402
from fxquant.fake_quantize import FakeQuantize  # noqa: E402
from fxquant.observers import (HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver,  # noqa: E402
                               MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver,
                               PlaceholderObserver)
from fxquant.qconfig import (default_dynamic_qconfig, default_per_channel_qconfig, default_qconfig,  # noqa: E402
                             float16_dynamic_qconfig, get_default_qat_qconfig, get_default_qat_qconfig_mapping,
                             get_default_qconfig, get_default_qconfig_mapping, per_channel_dynamic_qconfig)
from fxquant.qparams import DEFAULT_EPS, dtype_range, quantize_int  # noqa: E402

BACKENDS = ["fbgemm", "x86", "qnnpack"]


def _grid(obs: Any) -> tuple:
    return (obs.dtype, obs.qscheme, obs.quant_min, obs.quant_max)


def _table_min_scale(backend: str) -> float:
    scales = [e.constraints.min_scale for e in get_backend_config(backend).entries if e.constraints.min_scale]
    return max(scales, default=DEFAULT_EPS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_qconfig_follows_the_backend_table(backend: str) -> None:
    cfg = get_backend_config(backend)
    act, weight = get_default_qconfig(backend).activation(), get_default_qconfig(backend).weight()
    assert type(act) is HistogramObserver and type(weight) is PerChannelMinMaxObserver
    a, w = cfg.default_activation(), cfg.weight  # the activation grid on this CPU (7 bits on fbgemm without VNNI)
    assert _grid(act) == (a.dtype, a.qscheme, *dtype_range(a.dtype, a.reduce_range, a.quant_min, a.quant_max))
    assert act.reduce_range == a.reduce_range
    assert _grid(weight) == (w.dtype, w.qscheme, *dtype_range(w.dtype, w.reduce_range, w.quant_min, w.quant_max))
    assert act.eps == weight.eps == _table_min_scale(backend)
    if backend == "qnnpack":
        assert (weight.quant_min, weight.quant_max) == (-127, 127)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_qat_qconfig_uses_fake_quant_on_the_same_grids(backend: str) -> None:
    ptq, qat = get_default_qconfig(backend), get_default_qat_qconfig(backend)
    act, weight = qat.activation(), qat.weight()
    assert isinstance(act, FakeQuantize) and isinstance(weight, FakeQuantize)
    assert type(act.activation_post_process) is MovingAverageMinMaxObserver
    assert type(weight.activation_post_process) is MovingAveragePerChannelMinMaxObserver
    assert _grid(act) == _grid(ptq.activation()) and _grid(weight) == _grid(ptq.weight())
    assert act.activation_post_process.eps == weight.activation_post_process.eps == _table_min_scale(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_mappings_are_the_global_qconfig_plus_the_tables_weight_rules(backend: str) -> None:
    for mapping, qconfig in ((get_default_qconfig_mapping(backend), get_default_qconfig(backend)),
                             (get_default_qat_qconfig_mapping(backend), get_default_qat_qconfig(backend))):
        assert mapping.global_qconfig == qconfig
        assert not mapping.module_name_qconfigs and not mapping.module_name_regex_qconfigs
        # only ops whose kernels reject the default (per-channel) weight get an object-type setting
        assert set(mapping.object_type_qconfigs) == {nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d}
        for module_type, qc in mapping.object_type_qconfigs.items():
            w = qc.weight()
            w = getattr(w, "activation_post_process", w)
            assert w.qscheme in (torch.per_tensor_symmetric, torch.per_tensor_affine)
            assert qc.activation == qconfig.activation


def test_default_backend_is_x86_and_unknown_backend_says_which_exist() -> None:
    assert get_default_qconfig() == get_default_qconfig("x86")
    assert get_default_qconfig_mapping() == get_default_qconfig_mapping("x86")
    for fn in (get_default_qconfig, get_default_qat_qconfig, get_default_qconfig_mapping,
               get_default_qat_qconfig_mapping):
        with pytest.raises(ValueError, match="qnnpack"):
            fn("tpu")
    assert get_default_qconfig(get_backend_config("qnnpack")) == get_default_qconfig("qnnpack")


_small_arrays = arrays("float32", st.tuples(st.integers(1, 6), st.integers(1, 8)),
                       elements=st.floats(-2.0 ** -10, 2.0 ** -10, width=32))


@settings(max_examples=60, deadline=None)
@given(_small_arrays, st.sampled_from(BACKENDS), st.booleans())
def test_default_observers_respect_the_backend_constraints(data, backend: str, qat: bool) -> None:
    """Tiny-range data (the hard case for qnnpack's min scale) still gives qparams the kernels accept."""
    qconfig = get_default_qat_qconfig(backend) if qat else get_default_qconfig(backend)
    x = torch.from_numpy(data)
    act, weight = qconfig.activation(), qconfig.weight()
    act(x), weight(x)
    min_scale = _table_min_scale(backend)
    ranges = [e.constraints.weight_range for e in get_backend_config(backend).entries if e.constraints.weight_range]
    for obs in (act, weight):
        assert float(obs.qparams().scale.min()) >= min_scale
    w_qp = weight.qparams()
    w_int = quantize_int(x, w_qp)
    for lo, hi in ranges:
        assert lo <= int(w_int.min()) and int(w_int.max()) <= hi
    assert (w_qp.quant_min, w_qp.quant_max) == ((-127, 127) if backend == "qnnpack" else (-128, 127))


def test_convenience_qconfigs_match_torch_ao() -> None:
    ao = _ao()
    pairs = [(default_qconfig, ao.default_qconfig), (default_per_channel_qconfig, ao.default_per_channel_qconfig),
             (default_dynamic_qconfig, ao.default_dynamic_qconfig),
             (float16_dynamic_qconfig, ao.float16_dynamic_qconfig),
             (per_channel_dynamic_qconfig, ao.per_channel_dynamic_qconfig)]
    for ours, theirs in pairs:
        for role in ("activation", "weight"):
            o, t = getattr(ours, role)(), getattr(theirs, role)()
            assert type(o).__name__ == type(t).__name__, (role, o, t)
            assert (o.dtype, o.qscheme, o.is_dynamic) == (t.dtype, t.qscheme, getattr(t, "is_dynamic", False))
            if o.dtype in (torch.quint8, torch.qint8):
                assert (o.quant_min, o.quant_max) == (t.quant_min, t.quant_max), role
    assert type(default_dynamic_qconfig.activation()) is PlaceholderObserver
    assert type(default_qconfig.weight()) is MinMaxObserver


@pytest.mark.parametrize("qconfig", [get_default_qconfig("qnnpack"), get_default_qat_qconfig("x86"),
                                     default_dynamic_qconfig])
def test_qconfigs_pickle(qconfig: QConfig) -> None:
    again = pickle.loads(pickle.dumps(qconfig))
    assert again == qconfig and repr(again) == repr(qconfig)
    mapping = get_default_qconfig_mapping("qnnpack").set_object_type(nn.Linear, qconfig).set_module_name("fc", None)
    assert pickle.loads(pickle.dumps(mapping)) == mapping


# ------------------------------------------------------------------ user code with only the imports changed

TORCH_AO_SNIPPET = '''
import torch
from torch.ao.quantization import QConfigMapping, QConfig, get_default_qconfig_mapping
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

torch.manual_seed(0)
my_qconfig = QConfig(
    activation=MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine),
    weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
)
qconfig_mapping = (get_default_qconfig_mapping("qnnpack")
                   .set_object_type(torch.nn.Linear, my_qconfig)
                   .set_object_type("reshape", None)
                   .set_module_name_regex("features\\\\.[0-9]+", my_qconfig)
                   .set_module_name("head", None)
                   .set_module_name_object_type_order("", torch.nn.functional.relu, 0, None))
as_dict = qconfig_mapping.to_dict()
again = QConfigMapping.from_dict(as_dict)
act = my_qconfig.activation()
act(torch.randn(64) * 3 + 1)
scale, zero_point = act.calculate_qparams()
weight = my_qconfig.weight()
weight(torch.randn(8, 4))
w_scale, w_zero_point = weight.calculate_qparams()
result = dict(scale=scale, zero_point=zero_point, w_scale=w_scale, w_zero_point=w_zero_point,
              keys=sorted(as_dict),
              user_types=sorted(str(t) for t, _ in again.to_dict()["object_type"] if t in (torch.nn.Linear, "reshape")),
              regexes=[r for r, _ in as_dict["module_name_regex"]])
'''


def test_torch_ao_user_code_runs_with_only_the_imports_changed() -> None:
    ported = (TORCH_AO_SNIPPET.replace("from torch.ao.quantization.observer import", "from fxquant.observers import")
              .replace("from torch.ao.quantization import", "from fxquant import"))
    assert "torch.ao" not in ported
    reference: dict[str, Any] = {}
    ours: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(TORCH_AO_SNIPPET, "<torch.ao snippet>", "exec"), reference)
    exec(compile(ported, "<ported snippet>", "exec"), ours)
    expect, got = reference["result"], ours["result"]
    assert got.keys() == expect.keys()
    for key in expect:
        if isinstance(expect[key], torch.Tensor):
            torch.testing.assert_close(got[key], expect[key], rtol=0, atol=0, check_dtype=False)
        else:
            assert got[key] == expect[key], key
