import pytest
import torch

from vsraq_plugin.quantizer import compute_qparams, rtn


def _reference_grid(x, bits, sym):
    """Scalar re-statement of GPTQ's quant.py grid, one group at a time, in float64."""
    maxq = 2**bits - 1
    xmin, xmax = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if sym:
        xmax = max(abs(xmin), xmax)
        xmin = -xmax if xmin < 0 else xmin
    if xmin == 0 and xmax == 0:
        xmin, xmax = -1.0, 1.0
    scale = float(torch.tensor((xmax - xmin) / maxq).half())
    zero = (maxq + 1) / 2 if sym else round(-xmin / scale)
    codes = [min(max(round(v / scale) + zero, 0), maxq) for v in x.double().tolist()]
    return scale, zero, [scale * (c - zero) for c in codes]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_scalar_reference(bits, sym):
    g = torch.Generator().manual_seed(bits * 2 + sym)
    w = torch.randn(3, 64, generator=g) * 0.05 + (0.0 if sym else 0.02)
    q = rtn(w, bits, group_size=16, sym=sym)
    for r in range(3):
        for grp in range(4):
            scale, zero, deq = _reference_grid(w[r, grp * 16 : (grp + 1) * 16], bits, sym)
            assert q.scales[r, grp].item() == pytest.approx(scale, rel=0, abs=0)
            assert q.zeros[r, grp].item() == zero
            torch.testing.assert_close(
                q.weight[r, grp * 16 : (grp + 1) * 16].double(),
                torch.tensor(deq, dtype=torch.float64),
                rtol=1e-6,
                atol=1e-7,
            )


def test_rtn_error_bounded_by_half_step():
    w = torch.randn(8, 128)
    q = rtn(w, 4, group_size=32, sym=False)
    step = q.scales.repeat_interleave(32, dim=1)
    assert ((w - q.weight).abs() <= step / 2 + 1e-6).all()


def test_zero_group_and_nonnegative_group():
    scale, zero = compute_qparams(torch.zeros(1, 8), 4, sym=False)
    assert scale.item() == pytest.approx(2 / 15, rel=1e-3) and zero.item() == 8  # GPTQ's [-1, 1] fallback
    scale, zero = compute_qparams(torch.linspace(0.1, 1.0, 8)[None], 4, sym=False)
    assert zero.item() == 0  # range forced to include 0 -> xmin = 0


def test_rtn_rejects_nan_and_bad_group():
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        rtn(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(ValueError, match=r"does not divide the input dimension 10"):
        rtn(torch.randn(2, 10), 4, group_size=4)
