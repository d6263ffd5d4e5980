"""normalize rewrites: einsum matrix products -> matmul, swapaxes -> transpose (maxvit's attention)."""

import pytest
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
