"""normalize rewrites: einsum matrix products -> matmul, swapaxes -> transpose (maxvit's attention)."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
import torch
from torch import fx, nn

import fxquant
from fxquant.passes.normalize import NormalizePass, _matmul_form
from fxquant.report import float_ops


class EinsumAttention(nn.Module):
    """maxvit-style attention: einsum for the scores and the weighted sum, swapaxes on the way out."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.einsum("b h i d, b h j d -> b h i j", q, k)
        probs = scores.softmax(dim=-1)
        ctx = torch.einsum("bhij,bhjd->bhid", probs, v)
        return self.out(ctx.swapaxes(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("equation, expected", [
    ("b h i d, b h j d -> b h i j", True), ("bhij,bhjd->bhid", False), ("ij,jk->ik", False),
    ("ij,kj->ik", True), ("ii,ij->ij", None), ("bid,bjd->bji", None), ("i,i->", None), ("ij,jk", None),
    ("...ij,...jk->...ik", None)])
def test_matmul_form(equation, expected):
    assert _matmul_form(equation) is expected


def test_einsum_and_swapaxes_rewritten_with_the_same_function():
    torch.manual_seed(0)
    model = EinsumAttention().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 5, 16)
    expected = gm(x)
    gm = NormalizePass().run(gm, object()).graph_module
    targets = {n.target for n in gm.graph.nodes}
    assert torch.einsum not in targets and "swapaxes" not in targets
    assert torch.matmul in targets and "transpose" in targets
    torch.testing.assert_close(gm(x), expected)


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_einsum_attention_quantizes(backend):
    torch.manual_seed(0)
    model = EinsumAttention().eval()
    calib = [torch.randn(4, 5, 16) for _ in range(3)]
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), (calib[0],),
                                  backend_config=backend)
    fxquant.calibrate(prepared, calib, progress=False)
    quantized = fxquant.convert_fx(prepared)
    left = {f.op for f in float_ops(quantized)}
    assert not any("einsum" in op or "matmul" in op or "swapaxes" in op for op in left), left
    with torch.no_grad():
        assert fxquant.sqnr(model(calib[0]), quantized(calib[0])) > 20


def test_decomposed_attention_reads_the_projection_weights_in_place_and_computes_the_same():
    from fxquant.decomposed import DecomposedMultiheadAttention

    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    dec = DecomposedMultiheadAttention.from_float(mha)
    base, size = mha.in_proj_weight.data_ptr(), mha.in_proj_weight.numel() * mha.in_proj_weight.element_size()
    for proj in (dec.k_proj, dec.v_proj):   # views of in_proj_weight, not copies (q is scaled: a new tensor)
        assert base <= proj.weight.data_ptr() < base + size
    assert dec.out_proj.weight.data_ptr() == mha.out_proj.weight.data_ptr()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(dec(x, x, x)[0], mha(x, x, x)[0], atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(batch_first=st.booleans(), need_weights=st.booleans(),
       mask=st.sampled_from(["none", "bool", "float", "float per head", "padding", "bool and padding", "causal"]))
def test_decomposed_attention_computes_what_multihead_attention_does_with_every_mask(batch_first, need_weights, mask):
    """Without weights the float attention leaf, with them the matmul/softmax path: both take nn.MultiheadAttention's
    masks (True = not allowed) and return its output (and its head-averaged weights)."""
    from fxquant.decomposed import DecomposedMultiheadAttention

    torch.manual_seed(0)
    batch, tokens, heads = 2, 5, 4
    mha = nn.MultiheadAttention(16, heads, batch_first=batch_first).eval()
    dec = DecomposedMultiheadAttention.from_float(mha)
    x = torch.randn(batch, tokens, 16) if batch_first else torch.randn(tokens, batch, 16)
    blocked = torch.rand(tokens, tokens) > 0.6
    blocked.fill_diagonal_(False)  # no fully blocked row (its output is NaN either way)
    padding = torch.zeros(batch, tokens, dtype=torch.bool)
    padding[0, -2:] = True
    kwargs: dict = {
        "none": {}, "bool": {"attn_mask": blocked}, "float": {"attn_mask": torch.randn(tokens, tokens)},
        "float per head": {"attn_mask": torch.randn(batch * heads, tokens, tokens)},
        "padding": {"key_padding_mask": padding}, "bool and padding": {"attn_mask": blocked, "key_padding_mask": padding},
        "causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(tokens), "is_causal": True},
    }[mask]
    want_out, want_w = mha(x, x, x, need_weights=need_weights, **kwargs)
    got_kwargs = {k: v for k, v in kwargs.items() if not (mask == "causal" and k == "attn_mask")}
    got_out, got_w = dec(x, x, x, need_weights=need_weights, **got_kwargs)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
    else:
        assert got_w is None


# ------------------------------------------------------------------------------------------ Swin attention

def _swin_attention(v2: bool, dim: int = 16, heads: int = 2, window: int = 4, shift: int = 2,
                    seed: int = 0) -> nn.Module:
    """torchvision's Swin attention with small dims, random weights and a nonzero qkv bias (V2 ignores its key
    part: the decomposition must too)."""
    from torchvision.models import swin_transformer as st

    torch.manual_seed(seed)
    cls = st.ShiftedWindowAttentionV2 if v2 else st.ShiftedWindowAttention
    attn = cls(dim, [window, window], [shift, shift], heads)
    with torch.no_grad():
        attn.qkv.bias.normal_()
        attn.proj.bias.normal_()
        if not v2:
            attn.relative_position_bias_table.normal_()
    return attn.eval()


@settings(max_examples=25, deadline=None)
@given(v2=st.booleans(), batch=st.integers(1, 2), h=st.integers(1, 11), w=st.integers(1, 11),
       shift=st.sampled_from([0, 1, 2]))
@example(v2=False, batch=1, h=8, w=8, shift=2)
@example(v2=True, batch=2, h=5, w=9, shift=2)  # padded to 8 x 12 (bias-filled), shifted along both axes
@example(v2=False, batch=1, h=3, w=9, shift=2)  # one window covers the height: shifted along the width only
def test_decomposed_swin_attention_computes_what_torchvision_does(v2, batch, h, w, shift):
    """Every map size: whole windows or padded ones (a padded token's qkv is the projection's bias), shifted or not
    (no shift where one window covers the map), V1's scaled scores and V2's cosine scores without the key bias."""
    from fxquant.decomposed import DecomposedShiftedWindowAttention

    attn = _swin_attention(v2, shift=shift)
    dec = DecomposedShiftedWindowAttention(attn)
    x = torch.randn(batch, h, w, 16)
    with torch.no_grad():
        torch.testing.assert_close(dec(x), attn(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("v2", [False, True])
def test_decomposed_swin_attention_holds_the_same_parameters_and_trains_the_same(v2):
    """The decomposition holds the original's tensors under the original's names (state_dict keys unchanged,
    nothing copied), and in train mode the gradients of every parameter are torchvision's."""
    from fxquant.decomposed import DecomposedShiftedWindowAttention

    attn = _swin_attention(v2).train()
    dec = DecomposedShiftedWindowAttention(attn)
    assert dec.training
    ours, theirs = dec.state_dict(keep_vars=True), attn.state_dict(keep_vars=True)
    assert set(ours) == set(theirs) and all(ours[k] is theirs[k] for k in ours)
    x = torch.randn(2, 7, 6, 16)
    grads = []
    for module in (attn, dec):
        module.zero_grad()
        module(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) == {n for n, _ in attn.named_parameters()}
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-3)
    if v2:  # the key bias is unused: torchvision's gradient is 0, ours the rounding of two equal sums
        bias_grad = grads[1]["qkv.bias"]
        assert float(bias_grad[16:32].abs().max()) <= 1e-5 * float(bias_grad.abs().max())


class _SwinStage(nn.Module):
    """Two torchvision Swin blocks (plain and shifted windows) of 16 channels; on a 10 x 10 map the 7 x 7
    windows pad it to 14 x 14 (bias-filled qkv on the quantized path)."""

    def __init__(self, v2: bool) -> None:
        super().__init__()
        from torchvision.models import swin_transformer as st

        block = st.SwinTransformerBlockV2 if v2 else st.SwinTransformerBlock
        attn = st.ShiftedWindowAttentionV2 if v2 else st.ShiftedWindowAttention
        self.embed = nn.Linear(3, 16)
        self.blocks = nn.Sequential(*[block(16, 2, [7, 7], [s, s], attn_layer=attn) for s in (0, 3)])
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(dim=(1, 2)))


@pytest.mark.parametrize("v2", [False, True])
def test_swin_attention_projections_quantize_and_the_user_model_is_untouched(v2):
    """prepare_fx decomposes torchvision's Swin attention in its copy: the qkv and output projections (float in
    torch.ao, where they are tensors passed to one wrapped function) become int8 linears."""
    from torchvision.models import swin_transformer as st

    from fxquant.backends.kernels.qtensor import QuantizedLinear

    torch.manual_seed(0)
    model = _SwinStage(v2).eval()
    calib = [torch.randn(2, 10, 10, 3) for _ in range(3)]
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (calib[0],),
                                  backend_config="fbgemm")
    assert all(type(b.attn) in (st.ShiftedWindowAttention, st.ShiftedWindowAttentionV2) for b in model.blocks)
    fxquant.calibrate(prepared, calib, progress=False)
    quantized = fxquant.convert_fx(prepared)
    kernels = {name for name, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    assert {f"blocks.{i}.attn.{p}" for i in (0, 1) for p in ("qkv", "proj")} <= kernels
    with torch.no_grad():
        assert fxquant.sqnr(model(calib[0]), quantized(calib[0])) > 20


@pytest.mark.parametrize("v2", [False, True])
def test_swin_attention_trains_under_qat_and_converts(v2):
    """prepare_qat_fx: the decomposed attention trains with fake-quantized projections (the relative position
    table gets its gradient through the leaf), and converts to int8 projections."""
    import torch.nn.functional as F

    from fxquant.backends.kernels.qtensor import QuantizedLinear

    torch.manual_seed(0)
    model = _SwinStage(v2).train()
    x, target = torch.randn(4, 10, 10, 3), torch.randint(0, 5, (4,))
    qat = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping("fbgemm"), (x,),
                                 backend_config="fbgemm")
    table = "cpb_mlp.0.weight" if v2 else "relative_position_bias_table"
    before = qat.get_parameter(f"blocks.1.attn.{table}").detach().clone()
    opt = torch.optim.SGD(qat.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(qat(x), target).backward()
        opt.step()
    assert not torch.equal(qat.get_parameter(f"blocks.1.attn.{table}"), before)
    qat.eval()
    with torch.no_grad():
        simulated = qat(x)
    quantized = fxquant.convert_fx(qat)
    assert all(isinstance(quantized.get_submodule(f"blocks.1.attn.{p}"), QuantizedLinear) for p in ("qkv", "proj"))
    # the head writes the output; compared inside its grid: on a 7-bit grid (fbgemm on a CPU without VNNI) the
    # fake quantize clamps at code 127 where the int8 kernel, as torch's, writes up to 255 (three steps at lr 0.05
    # take the logits past the moving-average range)
    from models import activation_range

    qmin, qmax = activation_range("fbgemm")
    head = quantized.head
    lo, hi = (qmin - head._zp) * head._scale, (qmax - head._zp) * head._scale
    with torch.no_grad():
        assert fxquant.sqnr(simulated, quantized(x).clamp(lo, hi)) > 20


def test_swin_attention_dropout_follows_the_mode_after_qat():
    """Both Swin dropouts are modules of the decomposition: active while training, off once the QAT model is put in
    eval mode and converted (a function's training flag would be the one the model was traced with)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = _SwinStage(False)
    for block in model.blocks:
        block.attn.attention_dropout, block.attn.dropout = 0.5, 0.5
    model.train()
    x, target = torch.randn(2, 10, 10, 3), torch.randint(0, 5, (2,))
    qat = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping("fbgemm"), (x,),
                                 backend_config="fbgemm")
    assert not torch.equal(qat(x), qat(x))  # dropout acts in train mode
    F.cross_entropy(qat(x), target).backward()
    from fxquant.fake_quantize import disable_observer

    disable_observer(qat.eval())  # (observers would still move the grids between the two calls)
    with torch.no_grad():
        assert torch.equal(qat(x), qat(x))
        quantized = fxquant.convert_fx(qat)
        assert torch.equal(quantized(x), quantized(x))


@pytest.mark.parametrize("v2", [False, True])
def test_a_converted_swin_stage_scripts(v2):
    """torch.jit.script compiles the converted decomposition (the leaf module and its functions are TorchScript)."""
    import warnings

    torch.manual_seed(0)
    model = _SwinStage(v2).eval()
    x = torch.randn(2, 10, 10, 3)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    fxquant.calibrate(prepared, [x], progress=False)
    quantized = fxquant.convert_fx(prepared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = torch.jit.script(quantized)
    with torch.no_grad():
        assert torch.equal(scripted(x), quantized(x))


# ------------------------------------------------------------------------------------------ MaxViT attention

class _MaxVitAttention(nn.Module):
    """torchvision's MaxViT attention with small dims and a random relative position bias table."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

        torch.manual_seed(seed)
        self.attn = RelativePositionalMultiHeadAttention(32, 8, 16)  # 4 heads, 4 x 4 windows
        with torch.no_grad():
            self.attn.relative_position_bias_table.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


@pytest.mark.parametrize("batch, groups", [(1, 1), (2, 3)])
def test_decomposed_maxvit_attention_computes_what_torchvision_does_with_the_same_parameters(batch, groups):
    from fxquant.decomposed import DecomposedRelativePositionalAttention

    model = _MaxVitAttention().eval()
    dec = DecomposedRelativePositionalAttention(model.attn)
    assert dict(dec.state_dict()).keys() == dict(model.attn.state_dict()).keys()
    assert all(dec.get_parameter(n) is p for n, p in model.attn.named_parameters())  # the same objects
    x = torch.randn(batch, groups, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(dec(x), model.attn(x), atol=1e-5, rtol=1e-5)


def test_maxvit_attention_projections_quantize_around_one_float_leaf_and_the_converted_model_scripts():
    import warnings

    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    from fxquant.backends.kernels.qtensor import QuantizedLinear

    model = _MaxVitAttention().eval()
    calib = [torch.randn(2, 3, 16, 32) for _ in range(3)]
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (calib[0],),
                                  backend_config="fbgemm")
    assert type(model.attn) is RelativePositionalMultiHeadAttention  # the user's model is not touched
    fxquant.calibrate(prepared, calib, progress=False)
    quantized = fxquant.convert_fx(prepared)
    kernels = {name for name, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    assert {"attn.to_qkv", "attn.merge"} <= kernels
    assert {f.op for f in float_ops(quantized)} >= {"RelativePositionAttention"}
    assert not {"matmul", "einsum", "softmax"} & {f.op for f in float_ops(quantized)}
    with torch.no_grad():
        assert fxquant.sqnr(model(calib[0]), quantized(calib[0])) > 25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = torch.jit.script(quantized)
    with torch.no_grad():
        assert torch.equal(scripted(calib[0]), quantized(calib[0]))


def test_a_converted_multihead_attention_scripts():
    """The float attention leaf (and the mask function it calls) compiles under torch.jit.script."""
    import warnings

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 5, 16)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    fxquant.calibrate(prepared, [x], progress=False)
    quantized = fxquant.convert_fx(prepared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(quantized)
    with torch.no_grad():
        assert torch.equal(scripted(x), quantized(x))
