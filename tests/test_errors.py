"""Bad input gets a clear answer: each case checks that the message names the module / node / input involved and
says what to do, and that nothing ends in silent garbage or a raw kernel error (pytorch issue 34583: "Could not
run 'quantized::conv2d' with arguments from the 'CPU' backend").

Bad-input cases covered across the suite (this file adds 22-41; docs/errors.md lists every message):
  tests/test_api.py
     1 not an nn.Module (prepare_fx, fuse_fx)                  8 example_inputs of the wrong shape
     2 PTQ on a train-mode model                               9 untraceable control flow, partial=False: TraceError
     3 convert before calibration (every observer listed)         naming the submodule and the fix
     4 double convert                                         10 untraceable control flow, default: warning naming it
     5 convert of a model that was not prepared               11 converted model under the wrong quantized engine
     6 backend_config differs between prepare and convert     12 empty calibration data
     7 unknown backend name                                   13 calibration batches of mixed shapes (batch index)
    14 QConfigMapping naming a module that does not exist (warning)
  tests/test_passes.py  15 a qconfig the qnnpack table forbids (weight range, scale floor): QConfigError
  tests/test_fusion.py  16 fuse_fx on a train-mode model
  tests/test_qat.py     17 QAT on an eval-mode model
  tests/test_qconfig.py 18 a qconfig given an observer instance   19 a bad regex   20 unknown from_dict keys
  tests/test_partial.py 21 a partially prepared model called with another non-tensor argument than recorded
                            (also: double convert of a partial model)
  tests/test_backends.py (backend_config of the wrong type)
  this file
    22 a TorchScript module                        32 NaN/Inf in some calibration data (warning; convert still good)
    23 prepare / fuse of an already prepared or    33 zero-size calibration batches
       converted model                             34 calibrate on a float model / on a converted model
    24 a model on the meta device (PTQ and QAT)    35 one tensor passed as calibration data
    25 example_inputs of the wrong type / dtype    36 calibration batches of the wrong structure
    26 qconfig_mapping of the wrong type, torch.ao's   37 convert with another table under the same name;
       QConfigMapping                                  convert of a model moved to the meta device
    27 activation dtype the table forbids (qint8)   38 a converted model fed a quantized tensor (issue 34583)
    28 unknown prepare_custom_config key               or an int64 / float64 / float16 tensor
    29 non_traceable_module_name matching nothing   39 a converted model fed the wrong feature count / channels
       (warning)                                       (qnnpack used to return garbage)
    30 a regex matching no module (warning)         40 a state_dict from another model (sizes) / of a float model
    31 NaN-only calibration data                    41 a state_dict of another architecture (keys named)
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fxquant
from models import SmallCNN, quantize, seeded  # noqa: F401
from fxquant.backends import get_backend_config
from fxquant.errors import CalibrationError, ConvertError, EngineError, FxQuantError, QConfigError
from fxquant.observers import HistogramObserver

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
BACKENDS = ["fbgemm", "qnnpack", "x86"]


def mapping(backend: str = "fbgemm") -> fxquant.QConfigMapping:
    return fxquant.get_default_qconfig_mapping(backend)


def prepare(model: nn.Module, backend: str = "fbgemm", **kwargs):
    return fxquant.prepare_fx(model, mapping(backend), (X,), backend_config=backend, **kwargs)


def converted(backend: str = "fbgemm", model: nn.Module = None):
    return quantize(seeded(SmallCNN()) if model is None else model, X, backend)[1]


def no_raw_kernel_error(fn) -> FxQuantError:
    """Run ``fn``; it must raise an FxQuantError (ours, with a message), not a kernel's RuntimeError."""
    with pytest.raises(FxQuantError) as info:
        fn()
    assert "Could not run" not in str(info.value)
    return info.value


# ================================================================================================ the model itself

def test_torchscript_module_asks_for_the_python_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in favour of torch.compile / torch.export
        scripted = torch.jit.script(seeded(SmallCNN()))
    with pytest.raises(TypeError, match=r"prepare_fx needs the Python nn.Module: torch.fx cannot trace a TorchScript "
                                        r"module \(RecursiveScriptModule\); pass the model as it was before torch.jit"):
        prepare(scripted)


@pytest.mark.parametrize("fn", ["prepare_fx", "fuse_fx"])
def test_an_already_prepared_or_converted_model_is_refused(fn):
    prepared = prepare(seeded(SmallCNN()))
    fxquant.calibrate(prepared, [X], progress=False)
    call = (lambda m: prepare(m)) if fn == "prepare_fx" else (lambda m: fxquant.fuse_fx(m))
    for model, stage in ((prepared, "prepared"), (fxquant.convert_fx(prepared), "converted")):
        with pytest.raises(FxQuantError, match=f"{fn}: this model was already {stage} by fxquant; pass the original "
                                               "float model"):
            call(model)


def test_model_on_the_meta_device_says_to_materialize_it():
    model = seeded(SmallCNN()).to("meta")
    with pytest.raises(FxQuantError, match=r"prepare_fx: the model has parameters on the meta device, which hold no "
                                           r"values; materialize it first \(e.g. model.to_empty\(device='cpu'\)"):
        prepare(model)
    with pytest.raises(FxQuantError, match="prepare_qat_fx: the model has parameters on the meta device"):
        fxquant.prepare_qat_fx(model.train(), fxquant.get_default_qat_qconfig_mapping("fbgemm"), (X.to("meta"),),
                               backend_config="fbgemm")


# ===================================================================================================== arguments

@pytest.mark.parametrize("inputs, got", [(None, "NoneType"), ({"x": X}, "dict"), (3, "int")])
def test_example_inputs_of_the_wrong_type(inputs, got):
    with pytest.raises(TypeError, match=f"example_inputs must be a tuple of the model's positional inputs, got {got}"):
        fxquant.prepare_fx(seeded(SmallCNN()), mapping(), inputs, backend_config="fbgemm")


def test_example_inputs_of_the_wrong_dtype():
    with pytest.raises(FxQuantError, match=r"the model fails on example_inputs.*\(RuntimeError: Input type \(long "
                                           r"int\).*pass inputs of the shape and dtype the model takes"):
        fxquant.prepare_fx(seeded(SmallCNN()), mapping(), (X.long(),), backend_config="fbgemm")


@pytest.mark.parametrize("bad, shown", [(None, "builtins.NoneType"),
                                        (fxquant.get_default_qconfig("fbgemm"), "fxquant.qconfig.QConfig")])
def test_qconfig_mapping_of_the_wrong_type(bad, shown):
    with pytest.raises(TypeError, match=f"qconfig_mapping must be a fxquant.QConfigMapping \\(or its dict form\\), "
                                        f"got {shown}; fxquant.get_default_qconfig_mapping\\('x86'\\) is a good start"):
        fxquant.prepare_fx(seeded(SmallCNN()), bad, (X,), backend_config="fbgemm")


def test_torch_ao_qconfig_mapping_says_how_to_port_it():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        ao_mapping = get_default_qconfig_mapping("fbgemm")
    with pytest.raises(TypeError, match=r"got torch.ao.quantization.qconfig_mapping.QConfigMapping; torch.ao."
                                        r"quantization's mappings are not accepted: make the same calls on "
                                        r"fxquant.QConfigMapping"):
        fxquant.prepare_fx(seeded(SmallCNN()), ao_mapping, (X,), backend_config="fbgemm")


def test_activation_dtype_the_table_forbids_names_the_node_and_the_fix():
    qconfig = fxquant.get_default_qconfig("fbgemm").replace(activation=HistogramObserver.with_args(dtype=torch.qint8))
    with pytest.raises(QConfigError, match=r"node 'conv1' \(conv2d_relu\) on backend 'fbgemm': activation dtype "
                                           r"torch.qint8 is not supported; the kernel takes \['torch.quint8'\]. Use an "
                                           r"observer with dtype=torch.quint8"):
        fxquant.prepare_fx(seeded(SmallCNN()), fxquant.QConfigMapping().set_global(qconfig), (X,),
                           backend_config="fbgemm")


def test_unknown_prepare_custom_config_key_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"prepare_custom_config has unknown keys \['non_traceable_module_names'\]; "
                                         r"known: \['non_traceable_module_class', 'non_traceable_module_name'\]"):
        prepare(seeded(SmallCNN()), prepare_custom_config={"non_traceable_module_names": ["conv1"]})


def test_non_traceable_name_that_matches_no_module_warns():
    with pytest.warns(UserWarning, match=r"non_traceable_module_name \['convv'\] matches no submodule of SmallCNN "
                                         r"\(it has \['bn1', 'bn2', 'conv1', 'conv2', 'fc1'\]...\); check the "
                                         r"qualified names"):
        prepare(seeded(SmallCNN()), prepare_custom_config={"non_traceable_module_name": ["convv", "conv2"]})


def test_regex_that_matches_no_module_warns():
    qmap = mapping().set_module_name_regex(r"decoder\..*", None).set_module_name_regex(r"fc\d", None)
    with pytest.warns(UserWarning) as record:
        fxquant.prepare_fx(seeded(SmallCNN()), qmap, (X,), backend_config="fbgemm")
    messages = [str(w.message) for w in record]
    assert any(r"QConfigMapping names 'decoder\..*', which matches no module" in m and "check the spelling" in m
               for m in messages), messages
    assert not any(r"'fc\d'" in m for m in messages)  # it matches fc1 and fc2


# =================================================================================================== calibration

def test_nan_only_calibration_data_is_an_error_and_convert_lists_the_observers():
    prepared = prepare(seeded(SmallCNN()))
    with pytest.raises(CalibrationError, match=r"after 1 batch\(es\) no observer saw a finite value \(NaN/Inf-only "
                                               r"data or empty batches\?\): \[\"output of node 'x'\""):
        fxquant.calibrate(prepared, [torch.full_like(X, float("nan"))], progress=False)
    with pytest.raises(ConvertError, match=r"observer\(s\) saw no calibration data: 'x_observer' \(output of node "
                                           r"'x'\).*fxquant.calibrate\(prepared, batches\)"):
        fxquant.convert_fx(prepared)


def test_some_inf_in_calibration_data_is_ignored_with_a_warning():
    model = seeded(SmallCNN())
    prepared = prepare(model)
    spiked = X.clone()
    spiked[0, 0, 0, 0] = float("inf")
    with pytest.warns(UserWarning, match=r"calibration data produced NaN/Inf at \d+ observer\(s\), e.g. \[\"output "
                                         r"of node 'x'\".*they were ignored for the ranges"):
        fxquant.calibrate(prepared, [spiked, X], progress=False)
    with torch.no_grad():
        assert fxquant.sqnr(model(X), fxquant.convert_fx(prepared)(X)) > 25  # not garbage: inf did not set a range


def test_zero_size_calibration_batches_are_an_error():
    prepared = prepare(seeded(SmallCNN()))
    with pytest.raises(CalibrationError, match=r"no observer saw a finite value \(NaN/Inf-only data or empty batches"):
        fxquant.calibrate(prepared, [X[:0], X[:0]], progress=False)


def test_calibrate_on_a_float_or_a_converted_model():
    with pytest.raises(CalibrationError, match=r"calibrate expects the model returned by fxquant.prepare_fx \(got "
                                               r"SmallCNN, which has no observers\): prepare it first"):
        fxquant.calibrate(seeded(SmallCNN()), [X], progress=False)
    with pytest.raises(CalibrationError, match=r"calibrate: this model is already converted \(its observers are "
                                               r"gone\); calibrate the prepared model, then call convert_fx"):
        fxquant.calibrate(converted(), [X], progress=False)


def test_calibrate_on_a_prepared_model_without_observers_is_fine():
    prepared = fxquant.prepare_fx(seeded(SmallCNN()), fxquant.QConfigMapping(), (X,), backend_config="fbgemm")
    fxquant.calibrate(prepared, [X], progress=False)  # everything float: nothing to observe, nothing to complain about


def test_one_tensor_as_calibration_data():
    prepared = prepare(seeded(SmallCNN()))
    with pytest.raises(CalibrationError, match=r"calibrate: data is one tensor \(2, 3, 16, 16\); pass an iterable of "
                                               r"batches, e.g. \[x\] or a DataLoader"):
        fxquant.calibrate(prepared, X, progress=False)


@pytest.mark.parametrize("batch, shown, cause", [((X, X), "tuple", "takes 2 positional arguments but 3 were given"),
                                                 ({"y": X}, "dict", "unexpected keyword argument 'y'")])
def test_calibration_batch_of_the_wrong_structure(batch, shown, cause):
    prepared = prepare(seeded(SmallCNN()))
    with pytest.raises(CalibrationError, match=f"calibration batch 1 \\({shown}\\) failed in the model: TypeError: "
                                               f".*{cause}.*Batches must have the structure and shapes of "
                                               "example_inputs"):
        fxquant.calibrate(prepared, [X, batch], progress=False)


# ======================================================================================================= convert

def test_convert_with_another_table_under_the_same_name():
    import dataclasses


    prepared = prepare(seeded(SmallCNN()))
    fxquant.calibrate(prepared, [X], progress=False)
    table = get_backend_config("fbgemm")
    other = dataclasses.replace(table, entries=table.entries[:3])
    with pytest.raises(ConvertError, match=r"convert_fx: backend_config is another table than the one named 'fbgemm' "
                                           r"that prepared this model.*leave backend_config out"):
        fxquant.convert_fx(prepared, backend_config=other)
    assert fxquant.convert_fx(prepared, backend_config=table) is not None  # the same table is fine


def test_convert_of_a_model_moved_to_the_meta_device():
    prepared = prepare(seeded(SmallCNN()))
    fxquant.calibrate(prepared, [X], progress=False)
    with pytest.raises(ConvertError, match="convert_fx: the model has tensors on the meta device, which hold no "
                                           "values; convert the calibrated"):
        fxquant.convert_fx(copy.deepcopy(prepared).to("meta"))


# ============================================================================================ running the result

@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_tensor_input_says_to_pass_the_float_tensor(backend):
    """Without the input check: "Could not run 'aten::quantize_per_tensor' with arguments from the 'QuantizedCPU'
    backend" (the raw kernel error of pytorch issue 34583)."""
    model = converted(backend)
    qx = torch.quantize_per_tensor(X, 0.05, 128, torch.quint8)
    err = no_raw_kernel_error(lambda: model(qx))
    assert str(err).startswith("input 'x' is a quantized tensor (torch.quint8); the converted model takes "
                               "torch.float32 inputs and quantizes them itself: pass the float tensor")


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.float16])
def test_input_of_another_dtype_says_which_dtype(dtype):
    """Without the input check: "Quantize only works on Float Tensor, got Long"."""
    model = converted("fbgemm")
    err = no_raw_kernel_error(lambda: model(X.to(dtype)))
    assert str(err) == (f"input 'x' has dtype {dtype}, but the model was prepared with a torch.float32 example input "
                        "and quantizes it with kernels that take torch.float32; pass x.to(torch.float32)")
    with torch.no_grad():
        assert model(X).dtype == torch.float32  # the right dtype still runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_feature_count_names_the_linear_node(backend):
    """qnnpack's linear read past the input and returned numbers; fbgemm asserted about its packed matrix."""
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(torch.relu(x))

    model = quantize(seeded(Head()), torch.randn(8, 16), backend)[1]
    err = no_raw_kernel_error(lambda: model(torch.randn(8, 12)))
    kind = "OneDNNLinear" if get_backend_config(backend).kernels == "onednn" else "QuantizedLinear"
    assert str(err) == (f"{kind} at node 'fc': expects inputs with 16 features in the last dimension, like "
                        "the float Linear, got shape (8, 12); pass inputs shaped like the example the model was "
                        "prepared with")


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_channel_count_names_the_conv_node(backend):
    """qnnpack's conv ran on a 4-channel input of a 3-channel conv and returned numbers."""
    model = converted(backend)
    err = no_raw_kernel_error(lambda: model(torch.randn(2, 4, 16, 16)))
    kind = "OneDNNConv" if get_backend_config(backend).kernels == "onednn" else "QuantizedConv"
    assert str(err).startswith(f"{kind} at node 'conv1': expects a batched input with 3 channels and 2 spatial "
                               "dims (N, C, ...), got shape (2, 4, 16, 16); pass inputs shaped like the example")
    err = no_raw_kernel_error(lambda: model(X[0]))  # unbatched: the float conv takes it, the quantized one does not
    assert "got shape (3, 16, 16)" in str(err) and "x.unsqueeze(0)" in str(err)


def test_a_loaded_model_checks_its_engine_too():
    buf = io.BytesIO()
    torch.save(converted("qnnpack"), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.backends.quantized.engine = "fbgemm"
    with pytest.raises(EngineError, match="converted for the 'qnnpack' quantized engine but the current engine is "
                                          "'fbgemm'"):
        loaded(X)
    with pytest.raises(FxQuantError, match="input 'x' is a quantized tensor"):  # the input check travels too
        torch.backends.quantized.engine = "qnnpack"
        loaded(torch.quantize_per_tensor(X, 0.05, 128, torch.quint8))


def test_inputs_read_by_float_code_first_are_left_to_it():
    """The dtype check applies where the model quantizes an input straight away; code that casts first still works."""
    class Casts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(x.float())

    model = quantize(seeded(Casts()), torch.randn(8, 16), "fbgemm")[1]
    with torch.no_grad():
        assert torch.equal(model(torch.ones(8, 16, dtype=torch.int64)), model(torch.ones(8, 16)))
    with pytest.raises(FxQuantError, match="input 'x' is a quantized tensor"):
        model(torch.quantize_per_tensor(torch.ones(8, 16), 0.1, 0, torch.quint8))


# ==================================================================================================== state_dict

def test_state_dict_of_a_model_with_other_sizes_names_the_mismatched_weights():
    """It used to load silently (quantized weights are buffers, swapped wholesale) and run another model."""
    target = converted("fbgemm")
    source = converted("fbgemm", seeded(SmallCNN(channels=4)))
    with pytest.raises(RuntimeError) as info:
        target.load_state_dict(source.state_dict())
    msg = str(info.value)
    assert "size mismatch for conv1.weight: copying a quantized weight of shape (4, 3, 3, 3) from the checkpoint, " \
           "the shape in this model is (8, 3, 3, 3) (a state_dict of another model?)" in msg
    assert "size mismatch for conv1.bias: copying a bias of shape (4,) from the checkpoint, this model has (8,)" in msg
    assert "size mismatch for fc1.weight" in msg
    with torch.no_grad():
        assert converted("fbgemm")(X).shape == target(X).shape  # target's own weights are still in place
    assert target.conv1.weight.shape == (8, 3, 3, 3)


def test_float_state_dict_into_a_converted_model_says_to_quantize_again():
    target = converted("fbgemm")
    with pytest.raises(RuntimeError) as info:
        target.load_state_dict(seeded(SmallCNN()).state_dict())
    msg = str(info.value)
    assert "conv1.weight is a float weight but this module is a quantized QuantizedConv: load float weights into the " \
           "float model, then prepare, calibrate and convert it again" in msg
    assert 'Unexpected key(s) in state_dict: "bn1.weight"' in msg


def test_state_dict_of_another_architecture_names_the_keys():
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.stem(x).mean((2, 3)))

    target = converted("fbgemm")
    with pytest.raises(RuntimeError) as info:
        target.load_state_dict(converted("fbgemm", seeded(Other())).state_dict())
    msg = str(info.value)
    assert 'Missing key(s) in state_dict: "x_quantize.scale"' not in msg  # both have it
    assert '"conv1.weight_int"' in msg and '"stem.weight_int"' in msg  # missing and unexpected, by name


# ================================================================================= no raw kernel error, anywhere

@pytest.mark.parametrize("backend", BACKENDS)
def test_every_bad_input_to_a_converted_model_is_an_fxquant_error(backend):
    model = converted(backend)
    bad = {"quantized": torch.quantize_per_tensor(X, 0.05, 128, torch.quint8), "int64": X.long(),
           "bool": X > 0, "float64": X.double(), "channels": torch.randn(2, 1, 16, 16),
           "spatial": torch.randn(2, 3, 8, 8), "rank": torch.randn(3, 16, 16)}
    for name, x in bad.items():
        with pytest.raises(FxQuantError):
            with torch.no_grad():
                model(x)
