"""The public API: error messages users see, the user's model left alone, and save/load of converted models."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxquant
from models import SmallCNN, node_kinds, observer_nodes, quantize, seeded
from fxquant.api import STATE_KEY
from fxquant.backends.kernels.qtensor import (QuantizedBatchNorm, QuantizedBinary, QuantizedCat, QuantizedConv,
                                              QuantizedHardswish, QuantizedLinear)
from fxquant.errors import CalibrationError, ConvertError, EngineError, FxQuantError, TraceError

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def default_mapping(backend: str = "fbgemm") -> fxquant.QConfigMapping:
    return fxquant.get_default_qconfig_mapping(backend)


def prepare(model: nn.Module, backend: str = "fbgemm", **kwargs) -> fx.GraphModule:
    return fxquant.prepare_fx(model, default_mapping(backend), (X,), backend_config=backend, **kwargs)


# ====================================================================================================== errors

@pytest.mark.parametrize("fn", [
    lambda m: fxquant.prepare_fx(m, default_mapping(), (X,), backend_config="fbgemm"),
    lambda m: fxquant.fuse_fx(m),
])
def test_not_a_module(fn):
    with pytest.raises(TypeError, match=r"expects a torch.nn.Module, got function"):
        fn(lambda x: x)


def test_training_model_points_to_prepare_qat_fx():
    model = SmallCNN().train()
    with pytest.raises(FxQuantError, match=r"needs the model in eval mode: call model.eval\(\) first.*prepare_qat_fx"):
        prepare(model)
    assert model.training  # the error did not flip the flag


def test_convert_of_uncalibrated_model_lists_every_observer():
    prepared = prepare(seeded(SmallCNN()))
    names = [str(n.target) for n in observer_nodes(prepared)]
    assert len(names) == 6
    with pytest.raises(ConvertError) as info:
        fxquant.convert_fx(prepared)
    msg = str(info.value)
    assert msg.startswith("6 observer(s) saw no calibration data")
    assert all(f"'{name}'" in msg for name in names), msg
    assert "output of node 'conv1'" in msg and "fxquant.calibrate(prepared, batches)" in msg


def test_convert_twice():
    prepared = prepare(seeded(SmallCNN()))
    fxquant.calibrate(prepared, [X], progress=False)
    converted = fxquant.convert_fx(prepared)
    with pytest.raises(ConvertError, match="this model is already converted; convert the prepared model"):
        fxquant.convert_fx(converted)
    # converting the same prepared model again is fine (convert does not consume it) and gives the same model
    again = fxquant.convert_fx(prepared)
    with torch.no_grad():
        assert torch.equal(again(X), converted(X))
    assert not observer_nodes(converted) and len(observer_nodes(prepared)) == 6


@pytest.mark.parametrize("model", [seeded(SmallCNN()), fx.symbolic_trace(seeded(SmallCNN()))],
                         ids=["module", "plain_graph_module"])
def test_convert_of_a_model_that_was_not_prepared(model):
    with pytest.raises(ConvertError, match=r"convert_fx expects the model returned by fxquant.prepare_fx \(got "
                                           r"(SmallCNN|GraphModule)\); prepare it first"):
        fxquant.convert_fx(model)


def test_convert_with_another_backend_than_prepare():
    prepared = prepare(seeded(SmallCNN()))
    fxquant.calibrate(prepared, [X], progress=False)
    with pytest.raises(ConvertError, match="prepared for backend 'fbgemm' but backend_config='qnnpack'"):
        fxquant.convert_fx(prepared, backend_config="qnnpack")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; use one of \['fbgemm', 'qnnpack', 'x86'\]"):
        fxquant.prepare_fx(seeded(SmallCNN()), default_mapping(), (X,), backend_config="tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        fxquant.get_default_qconfig_mapping("tpu")


def test_example_inputs_of_the_wrong_shape():
    with pytest.raises(FxQuantError, match=r"the model fails on example_inputs at node 'fc1' \(RuntimeError: "
                                           r"mat1 and mat2.*\); pass inputs of the shape and dtype the model takes"):
        fxquant.prepare_fx(seeded(SmallCNN()), default_mapping(), (torch.randn(2, 3, 8, 8),), backend_config="fbgemm")


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), Gate())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_untraceable_submodule_is_named_and_can_be_kept_float():
    model = seeded(WithGate())
    with pytest.raises(TraceError) as info:
        prepare(model, partial=False)
    msg = str(info.value)
    assert "submodule 'block.1' (Gate)" in msg and "control flow" in msg
    assert "prepare_custom_config={'non_traceable_module_name': ['block.1']}" in msg
    assert "set_non_traceable_module_names(['block.1'])" in msg
    prepared = prepare(model, prepare_custom_config={"non_traceable_module_name": ["block.1"]})
    assert "Gate" in node_kinds(prepared)  # kept as one opaque call
    fxquant.calibrate(prepared, [X], progress=False)
    converted = fxquant.convert_fx(prepared)
    assert type(converted.get_submodule("block.1")) is Gate  # runs in float, between a dequantize and a quantize
    assert isinstance(converted.stem, QuantizedConv) and isinstance(converted.head, QuantizedConv)
    assert 'getattr(self.block, "1")(dequantize)' in converted.code  # float in ...
    assert "self.head(block_1_quantize)" in converted.code  # ... quantized again after it
    with torch.no_grad():
        assert fxquant.sqnr(model(X), converted(X)) > 25
        assert fxquant.sqnr(model(-X), converted(-X)) > 20  # the other branch of the gate still works


def test_untraceable_submodule_by_default_quantizes_the_traceable_pieces_with_a_warning():
    model = seeded(WithGate())
    with pytest.warns(UserWarning, match=r"torch.fx cannot trace WithGate whole .* kept the code of 1 module\(s\) "
                                         r"float: 'block.1': .*Pass partial=False to get the error instead"):
        prepared = prepare(model)
    fxquant.calibrate(prepared, [X, -X], progress=False)
    converted = fxquant.convert_fx(prepared)
    with torch.no_grad():
        assert fxquant.sqnr(model(X), converted(X)) > 25
        assert fxquant.sqnr(model(-X), converted(-X)) > 20


def test_running_under_the_wrong_engine_raises_engine_error():
    prepared = prepare(seeded(SmallCNN()), backend="qnnpack")
    fxquant.calibrate(prepared, [X], progress=False)
    converted = fxquant.convert_fx(prepared)
    assert torch.backends.quantized.engine == "qnnpack"  # convert_fx selected it
    torch.backends.quantized.engine = "fbgemm"
    with pytest.raises(EngineError, match="converted for the 'qnnpack' quantized engine but the current engine is "
                                          "'fbgemm'; set torch.backends.quantized.engine = 'qnnpack'"):
        converted(X)
    torch.backends.quantized.engine = "qnnpack"
    with torch.no_grad():
        assert converted(X).shape == (2, 10)


def test_calibrate_on_empty_data():
    prepared = prepare(seeded(SmallCNN()))
    with pytest.raises(CalibrationError, match="calibration data was empty: pass at least one batch"):
        fxquant.calibrate(prepared, [], progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        fxquant.calibrate(prepared, iter(()), progress=False)


def test_calibrate_with_a_bad_batch_names_its_index():
    prepared = prepare(seeded(SmallCNN()))
    with pytest.raises(CalibrationError, match=r"calibration batch 1 \(\(2, 3, 8, 8\)\) failed in the model"):
        fxquant.calibrate(prepared, [X, torch.randn(2, 3, 8, 8)], progress=False)


def test_qconfig_mapping_naming_a_missing_module_warns():
    mapping = default_mapping().set_module_name("encoder.layer9", None).set_module_name("conv2", None)
    with pytest.warns(UserWarning) as record:
        prepare_model = fxquant.prepare_fx(seeded(SmallCNN()), mapping, (X,), backend_config="fbgemm")
    messages = [str(w.message) for w in record]
    assert any("'encoder.layer9', which matches no module" in m for m in messages), messages
    assert not any(m.startswith("QConfigMapping names 'conv2'") for m in messages)  # it exists: no warning
    assert prepare_model is not None


# ======================================================================================== user's model untouched

def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in model.named_modules()],
            [m.training for m in model.modules()])


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_prepare_and_convert_do_not_mutate_the_users_model(backend):
    model = seeded(SmallCNN())
    with torch.no_grad():
        before_out = model(X)
    state, types, training = _snapshot(model)
    prepared = prepare(model, backend)
    fxquant.calibrate(prepared, [X, 2 * X], progress=False)
    prepared_state = {k: v.clone() for k, v in prepared.state_dict().items()}
    converted = fxquant.convert_fx(prepared)
    after_state, after_types, after_training = _snapshot(model)
    assert after_types == types and after_training == training
    assert state.keys() == after_state.keys() and all(torch.equal(state[k], after_state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(X), before_out)
    # no module object is shared between the user's model, the prepared and the converted model
    ids = {id(m) for m in model.modules()}
    assert not ids & {id(m) for m in prepared.modules()} and not ids & {id(m) for m in converted.modules()}
    # convert leaves the prepared model (and its observers' statistics) as they were
    assert all(torch.equal(v, prepared.state_dict()[k]) for k, v in prepared_state.items())
    assert prepared.meta[STATE_KEY].stage == "prepared" and converted.meta[STATE_KEY].stage == "converted"


# ================================================================================================== save / load

class KitchenSink(nn.Module):
    """Every quantized module kind: conv (+relu, depthwise), standalone bn, add, mul, cat, hardswish, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.hs = nn.Hardswish()
        self.conv3 = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = self.conv2(a)
        c = self.bn(a + b)
        # c is read twice, so the cat requantizes it (the other two are written in the cat's grid)
        d = torch.cat([self.hs(c), c * torch.sigmoid(b), c], 1)
        e = self.conv3(d)
        return self.fc(F.adaptive_avg_pool2d(e, 1).flatten(1))


KINDS = (QuantizedConv, QuantizedLinear, QuantizedBatchNorm, QuantizedBinary, QuantizedCat, QuantizedHardswish)


def _converted(backend: str, scale: float = 1.0, model: nn.Module = None) -> fx.GraphModule:
    gen = torch.Generator().manual_seed(int(scale * 10))
    model = seeded(KitchenSink()) if model is None else model
    calib = [scale * torch.randn(2, 3, 16, 16, generator=gen) for _ in range(2)]
    return quantize(model, X, backend, calib)[1]


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_torch_save_of_the_whole_converted_model_round_trips_exactly(backend):
    converted = _converted(backend)
    assert {type(m) for m in converted.modules()} >= set(KINDS)
    loaded = _roundtrip(converted)
    with torch.no_grad():
        assert torch.equal(loaded(X), converted(X))
    assert loaded.code == converted.code
    assert [type(m) for m in loaded.modules()][1:] == [type(m) for m in converted.modules()][1:]


def test_torch_save_keeps_the_quant_state_and_the_engine_check():
    loaded = _roundtrip(_converted("qnnpack"))
    assert loaded.meta[STATE_KEY].stage == "converted"
    torch.backends.quantized.engine = "fbgemm"
    with pytest.raises(EngineError):
        loaded(X)


def test_torch_save_of_a_prepared_model_keeps_its_observers():
    prepared = prepare(seeded(KitchenSink()))
    fxquant.calibrate(prepared, [X], progress=False)
    loaded = _roundtrip(prepared)
    assert len(observer_nodes(loaded)) == len(observer_nodes(prepared))
    assert loaded.state_dict().keys() == prepared.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in prepared.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(X), prepared(X))


def test_a_loaded_prepared_model_can_be_converted():
    prepared = prepare(seeded(KitchenSink()))
    fxquant.calibrate(prepared, [X], progress=False)
    with torch.no_grad():
        assert torch.equal(fxquant.convert_fx(_roundtrip(prepared))(X), fxquant.convert_fx(prepared)(X))


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_state_dict_into_a_freshly_converted_twin_reproduces_outputs_exactly(backend):
    model = seeded(KitchenSink())
    source = _converted(backend, 1.0, model)
    twin = _converted(backend, 3.0, model)  # other calibration data: other qparams everywhere
    with torch.no_grad():
        assert not torch.equal(source(X), twin(X))
        assert source.fc._scale != twin.fc._scale
    result = twin.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert twin.fc._scale == source.fc._scale and twin.x_quantize._zp == source.x_quantize._zp  # mirrors updated
    with torch.no_grad():
        assert torch.equal(twin(X), source(X))
    # and through bytes, as a checkpoint would travel
    fresh = _converted(backend, 3.0, model)
    fresh.load_state_dict(_roundtrip(source.state_dict()))
    with torch.no_grad():
        assert torch.equal(fresh(X), source(X))


@settings(max_examples=10)
@given(seed=st.integers(0, 2 ** 16), backend=st.sampled_from(["fbgemm", "qnnpack"]),
       calib_scale=st.floats(0.1, 10.0))
def test_property_save_load_round_trips_exactly(seed, backend, calib_scale):
    model = seeded(SmallCNN(), seed)
    gen = torch.Generator().manual_seed(seed)
    calib = [calib_scale * torch.randn(2, 3, 16, 16, generator=gen) for _ in range(2)]
    x = torch.randn(2, 3, 16, 16, generator=gen)
    _, converted = quantize(model, x, backend, calib)
    with torch.no_grad():
        expected = converted(x)
        assert torch.equal(_roundtrip(converted)(x), expected)
        _, twin = quantize(model, x, backend, [x])
        twin.load_state_dict(converted.state_dict())
        assert torch.equal(twin(x), expected)


# ------------------------------------------------------- prepare_fx reads the user's weights where they are

class _Counting(nn.Module):
    """An unfusable conv -> relu -> bn -> conv whose forward also writes a buffer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls.add_(1)
        return self.body(x)


def _users_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prepare_shares_weight_memory_but_nothing_the_prepared_model_does_reaches_the_user():
    model, x = seeded(_Counting(), 0).eval(), torch.randn(2, 3, 8, 8)
    before = _users_state(model)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    # no copy of the float weights (the memory win) ...
    assert prepared.get_submodule("body.3").weight.data_ptr() == model.body[3].weight.data_ptr()
    # ... yet the forward run on the example (a buffer write), calibration, a state_dict load and training
    # leave the user's model as it was
    fxquant.calibrate(prepared, [x], progress=False)
    assert _unchanged(model, before)
    prepared.load_state_dict({k: v + 1 if v.is_floating_point() else v for k, v in prepared.state_dict().items()})
    assert _unchanged(model, before)
    other = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    other.train()
    opt = torch.optim.SGD(other.parameters(), lr=0.5)
    other(x).sum().backward()
    opt.step()
    assert _unchanged(model, before)
    assert other.get_submodule("body.3").weight.data_ptr() != model.body[3].weight.data_ptr()


@pytest.mark.parametrize("name", ["body.3", "body.0"])   # a plain conv; conv + relu (the conv one level down)
def test_a_submodule_trained_on_its_own_leaves_the_user_alone(name):
    """A gradient that reaches a shared parameter without the top-level forward (a submodule called on its own)
    copies the parameter when it is accumulated, so the optimizer step writes the copy."""
    model, x = seeded(_Counting(), 0).eval(), torch.randn(2, 3, 8, 8)
    before = _users_state(model)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    sub = prepared.get_submodule(name)
    untrained = [p.detach().clone() for p in sub.parameters()]
    opt = torch.optim.SGD(prepared.parameters(), lr=0.5)
    sub(torch.randn(2, 4 if name == "body.3" else 3, 8, 8)).sum().backward()
    opt.step()
    assert _unchanged(model, before)
    assert not all(torch.equal(a, p) for a, p in zip(untrained, sub.parameters()))  # the copy did train


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_training_a_projection_of_a_decomposed_attention_leaves_the_user_alone():
    """The decomposed attention's k and v projections are views into the middle of the user's in_proj_weight:
    their gradients copy them too."""
    model, x = seeded(_Attention(), 0).eval(), torch.randn(2, 5, 8)
    before = _users_state(model)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    k_proj = prepared.get_submodule("attn.k_proj")
    assert k_proj.weight.untyped_storage().data_ptr() == model.attn.in_proj_weight.untyped_storage().data_ptr()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.5)
    k_proj(x).sum().backward()
    opt.step()
    assert _unchanged(model, before)


def _conv_bn_stack() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


@pytest.mark.parametrize("factory, name", [
    (_Counting, "body.3"),        # a plain conv
    (_Counting, "body.0"),        # conv + relu
    (_conv_bn_stack, "3"),        # a conv folded with its batch norm on read (FoldedConv2d)
    (_conv_bn_stack, "0"),        # conv + bn + relu: the folded conv one level down
])
def test_loading_a_state_dict_into_a_submodule_leaves_the_user_alone(factory, name):
    """``prepared.<sub>.load_state_dict`` (a fine-tuned head, say) loads into that submodule's own copy of the
    weights: the submodule's parameters share the user's memory until then, and load_state_dict writes in place."""
    model, x = seeded(factory(), 0).eval(), torch.randn(2, 3, 8, 8)
    before = _users_state(model)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    sub = prepared.get_submodule(name)
    shared = {k for k, p in sub.named_parameters() if any(p.data_ptr() == q.data_ptr() for q in model.parameters())}
    assert shared  # the premise: the submodule reads the user's memory
    new_state = {k: v + 1 if v.is_floating_point() else v for k, v in sub.state_dict().items()}
    sub.load_state_dict(new_state)
    assert _unchanged(model, before)
    assert all(torch.equal(sub.state_dict()[k], v) for k, v in new_state.items())


def test_the_prepare_copy_keeps_the_user_s_modules_hooks_and_settings_apart():
    from fxquant.api import _copy_sharing_weights

    shared = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    model.settings = {"scale": 1.0}
    model.register_buffer("steps", torch.zeros(()))
    calls: list[str] = []
    shared.register_forward_hook(lambda *a: calls.append("user hook"))
    copied = _copy_sharing_weights(model)
    assert copied[0] is copied[2] and copied[0] is not shared          # sharing inside the model survives
    assert copied[0].weight is not shared.weight and copied[0].weight.data_ptr() == shared.weight.data_ptr()
    assert copied.steps.data_ptr() != model.steps.data_ptr()             # buffers are copied
    copied[0].register_forward_hook(lambda *a: calls.append("copy hook"))
    copied.settings["scale"] = 2.0
    copied[1] = nn.Identity()
    model(torch.randn(1, 3, 2, 2))
    assert calls == ["user hook", "user hook"] and model.settings == {"scale": 1.0}
    assert isinstance(model[1], nn.ReLU)


class _BlocksInATuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
        self.blocks = (self.a, self.b)    # the same modules held by a plain attribute too
        self.by_name = {"a": self.a}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


def test_modules_held_in_plain_attributes_are_the_copies_and_still_quantize():
    from fxquant.api import _copy_sharing_weights

    model = _BlocksInATuple().eval()
    copied = _copy_sharing_weights(model)
    assert copied.blocks[0] is copied.a and copied.by_name["a"] is copied.a and copied.a is not model.a
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # traced whole: no partial-preparation warning
        prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,),
                                      backend_config="fbgemm")
    fxquant.calibrate(prepared, [x], progress=False)
    assert sum(isinstance(m, QuantizedConv) for m in fxquant.convert_fx(prepared).modules()) == 2


def test_a_pass_that_writes_weights_in_place_is_an_error():
    class Scale:
        name = "scale_in_place"

        def run(self, gm, ctx=None):
            from fxquant.passes.base import PassResult

            with torch.no_grad():
                for p in gm.parameters():
                    p.mul_(2)
            return PassResult(gm, True)

    from fxquant.passes.pipelines import prepare_pipeline

    model = nn.Sequential(nn.Linear(4, 4)).eval()
    before = _users_state(model)
    pm = prepare_pipeline()
    pm.insert_after("normalize", Scale())
    with pytest.raises(FxQuantError, match=r"wrote into the model's own weights \(0.weight"):
        fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (torch.randn(2, 4),),
                           backend_config="fbgemm", pipeline=pm)
    assert not _unchanged(model, before)  # it did write (the error says so rather than pass silently)


@pytest.mark.parametrize("qat", [False, True])
def test_nothing_is_kept_alive_once_the_user_drops_the_models(qat):
    """No module-level cache of fxquant holds a model, a prepared or a converted one (torch 2.14's torch.ao does:
    its prepare_fx memoizes a helper keyed by the model, so every model it prepares lives as long as the process;
    tests/bench_torch_ao.py clears that cache between runs)."""
    import gc
    import weakref

    def parameters_alive() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, nn.Parameter))

    def run() -> list[weakref.ref]:
        model = seeded(SmallCNN())
        x = torch.randn(2, 3, 16, 16)
        if qat:
            prepared = fxquant.prepare_qat_fx(model.train(), fxquant.get_default_qat_qconfig_mapping("fbgemm"), (x,),
                                              backend_config="fbgemm")
            prepared(x)
            prepared.eval()
        else:
            prepared = fxquant.prepare_fx(model.eval(), default_mapping(), (x,), backend_config="fbgemm")
        fxquant.calibrate(prepared, [x], progress=False)
        converted = fxquant.convert_fx(prepared)
        converted(x)
        return [weakref.ref(m) for m in (model, prepared, converted)]

    run()  # first calls fill the lazily built tables (backend configs, kernel checks): not per-model state
    gc.collect()
    before = parameters_alive()
    refs = run()
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
    assert parameters_alive() == before


def test_kernels_keep_their_weights_packed_only():
    """A converted conv or linear holds its int8 weight once, in the kernel's packed form: ``weight`` unpacks
    it (the same integers and grid as quantizing the float weight), and state_dict, loading into another model,
    deep copies and pickling all go through that."""
    import copy
    import pickle

    x = torch.randn(2, 3, 16, 16)

    def converted(seed: int) -> fx.GraphModule:
        prepared = fxquant.prepare_fx(seeded(SmallCNN(), seed), default_mapping(), (x,), backend_config="fbgemm")
        fxquant.calibrate(prepared, [x], progress=False)
        return fxquant.convert_fx(prepared)

    q = converted(0)
    kernels = [m for m in q.modules() if isinstance(m, (QuantizedConv, QuantizedLinear))]
    assert kernels
    for k in kernels:
        assert "weight" not in k._buffers and k.__dict__.get("_kept_weight") is None
        w = k.weight
        assert w.is_quantized and w.dtype == torch.qint8 and tuple(w.shape) == k.weight_shape
    expected = q(x)
    other = converted(1)
    assert not torch.equal(other(x), expected)
    other.load_state_dict(q.state_dict())
    assert torch.equal(other(x), expected)
    assert torch.equal(copy.deepcopy(q)(x), expected)
    assert torch.equal(pickle.loads(pickle.dumps(q))(x), expected)
    for a, b in zip(kernels, [m for m in other.modules() if isinstance(m, (QuantizedConv, QuantizedLinear))]):
        assert torch.equal(a.weight.int_repr(), b.weight.int_repr())
        assert torch.equal(a.weight.q_per_channel_scales(), b.weight.q_per_channel_scales())


_DIRECT_CASES = {
    "conv1d": (nn.Conv1d(3, 4, 3), (1, 3, 9)),
    "conv2d": (nn.Conv2d(3, 4, 3), (1, 3, 9, 9)),
    "conv2d_relu": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (1, 3, 9, 9)),
    "conv3d": (nn.Conv3d(3, 4, 3), (1, 3, 5, 5, 5)),
    "conv_transpose2d": (nn.ConvTranspose2d(3, 4, 3), (1, 3, 6, 6)),
    "linear": (nn.Linear(8, 5), (2, 8)),
    "linear_relu": (nn.Sequential(nn.Linear(8, 5), nn.ReLU()), (2, 8)),
}


class _NotAScriptObject:
    """Stands for a FakeScriptObject (what torch.export traces with): any packed weight that is not a real
    ``torch.ScriptObject``."""

    def __init__(self, real: object) -> None:
        self.real = real


@pytest.mark.parametrize("case", sorted(_DIRECT_CASES))
def test_kernels_call_the_op_entry_directly_and_the_overload_for_anything_else(case, monkeypatch):
    """Converted convs and linears call the C++ entry of their op (skipping the overload's Python scan for fake
    script objects, a tenth of a small conv's time; ``qtensor.call_packed``): the same values as the public op. A
    packed weight that is not a real ScriptObject goes through the overload, whose Python dispatch handles fake
    ones."""
    from fxquant.backends.kernels import qtensor, qtensor_ops
    from fxquant.backends.kernels.qtensor_ops import QuantizedConvTranspose

    model, shape = _DIRECT_CASES[case]
    x = torch.randn(*shape)
    prepared = fxquant.prepare_fx(seeded(model), default_mapping(), (x,), backend_config="fbgemm")
    fxquant.calibrate(prepared, [x], progress=False)
    q = fxquant.convert_fx(prepared)
    (k,) = [m for m in q.modules() if isinstance(m, (QuantizedConv, QuantizedLinear, QuantizedConvTranspose))]
    qx = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)
    public = getattr(torch.ops.quantized, case)
    expected = public(qx, k._packed, k._scale, k._zp)
    assert torch.equal(k(qx).int_repr(), expected.int_repr())
    # the entry is the public op's own (a relu output's zero point 0 would hide a conv / conv+relu swap)
    overload = public.new if hasattr(public, "new") else public.default
    if "transpose" in case:
        assert qtensor_ops._TRANSPOSE_OPS[k.dims][1] is overload
    elif case.startswith("conv"):
        assert qtensor._CONV_OPS[k.dims][2 if k.relu else 1] is overload and k.relu == case.endswith("relu")
    else:
        assert qtensor._LINEAR_OPS[k.relu] is overload and k.relu == case.endswith("relu")

    calls = []
    tables = {"conv": (qtensor, "_CONV_OPS"), "line": (qtensor, "_LINEAR_OPS"),
              "conv_tr": (qtensor_ops, "_TRANSPOSE_OPS")}
    module, name = tables["conv_tr" if "transpose" in case else case[:4]]
    real_ops = getattr(module, name)

    def recording(op):
        def run(x, packed, *rest):
            calls.append(type(packed))
            return op(x, packed.real, *rest)
        run._op = op._op   # the entry call_packed takes for a real packed weight
        return run

    if isinstance(real_ops, dict):
        patched = {n: tuple(recording(op) if i else op for i, op in enumerate(ops)) for n, ops in real_ops.items()}
    else:
        patched = tuple(recording(op) for op in real_ops)
    monkeypatch.setattr(module, name, patched)
    assert torch.equal(k(qx).int_repr(), expected.int_repr())
    assert calls == []  # a real packed weight: the entry, not the (patched) overload
    k.__dict__["_packed"] = _NotAScriptObject(k._packed)
    assert torch.equal(k(qx).int_repr(), expected.int_repr())
    assert calls == [_NotAScriptObject]


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_dynamic_linears_on_the_direct_path_give_the_public_ops_values(fp16, relu, monkeypatch):
    """The dynamic int8 and float16 linears take the same direct path (the public op's entry, without the
    ``__torch_function__`` lookup on the packed weight): its values."""
    from fxquant.backends.kernels import dynamic, qtensor
    from fxquant.qparams import QParams

    linear = seeded(nn.Linear(8, 5))
    x = torch.randn(3, 8)
    name = ("linear_relu_dynamic" if relu else "linear_dynamic") + ("_fp16" if fp16 else "")
    public = getattr(torch.ops.quantized, name)
    if fp16:
        k = dynamic.DynamicLinearFP16(linear, relu=relu)
        args: tuple = ()
        assert dynamic._DYNAMIC_FP16_OPS[k.relu] is public.default
    else:
        scale = linear.weight.detach().abs().amax() / 127
        k = dynamic.DynamicLinear(linear, QParams(scale.reshape(()), torch.tensor(0), torch.qint8,
                                                  torch.per_tensor_symmetric, -128, 127), relu=relu,
                                  engine_name="fbgemm")
        args = (k.reduce_range,)  # 7-bit on a CPU without VNNI (the fbgemm table's default_activation)
        assert dynamic._DYNAMIC_OPS[k.relu] is public.default
    entered = []
    real = qtensor._no_subclass_dispatch
    monkeypatch.setattr(qtensor, "_no_subclass_dispatch", lambda: entered.append(1) or real())
    assert torch.equal(k(x), public(x, k._packed, *args))
    assert torch.equal(k(x[0]), public(x[:1], k._packed, *args)[0])  # an unbatched input
    assert len(entered) == 2


def test_qnnpack_3d_convs_keep_their_weight_beside_the_packed_one():
    """qnnpack cannot unpack a 3-d conv's weight, so that kernel keeps it; state_dict still works."""
    model = seeded(nn.Sequential(nn.Conv3d(2, 4, 3), nn.ReLU()))
    x = torch.randn(1, 2, 6, 6, 6)
    prepared = fxquant.prepare_fx(model, default_mapping("qnnpack"), (x,), backend_config="qnnpack")
    fxquant.calibrate(prepared, [x], progress=False)
    q = fxquant.convert_fx(prepared)
    (k,) = [m for m in q.modules() if isinstance(m, QuantizedConv)]
    assert k.__dict__.get("_kept_weight") is not None and k.weight is k.__dict__["_kept_weight"]
    assert any(key.endswith("weight_int") for key in q.state_dict())


class _ReadsItsConvsBuffer(nn.Module):
    """A forward that reads a buffer of a conv (which becomes a kernel) twice, beside calling the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv.register_buffer("gain", torch.full((1, 4, 1, 1), 0.5))

    def forward(self, x):
        return self.conv(x), torch.mul(x.mean(), self.conv.gain) + torch.mul(x.amax(), self.conv.gain)


def test_a_float_tensor_read_from_a_module_that_became_a_kernel_gets_one_name_of_its_own():
    model, x = seeded(_ReadsItsConvsBuffer()), torch.randn(2, 3, 8, 8)
    mapping = default_mapping().set_object_type(torch.mul, None)  # the reads stay float
    prepared = fxquant.prepare_fx(model, mapping, (x,), backend_config="fbgemm")
    fxquant.calibrate(prepared, [x], progress=False)
    q = fxquant.convert_fx(prepared)
    assert isinstance(q.conv, QuantizedConv)
    reads = [str(n.target) for n in q.graph.nodes if n.op == "get_attr" and "gain" in str(n.target)]
    assert reads == ["conv_gain", "conv_gain"]  # both reads, one attribute, not under the kernel
    assert torch.equal(q.conv_gain, model.conv.gain)
    out, expected = q(x), model(x)
    # the reads are float; the add after them is quantized (8-bit activations give the float value here, the
    # 7-bit ones fbgemm uses on a CPU without VNNI are 0.8% off)
    assert fxquant.sqnr(expected[0], out[0]) > 25 and fxquant.sqnr(expected[1], out[1]) > 30
    q.load_state_dict(q.state_dict())  # the kernel's state_dict is its own (it once held the float tensor)
