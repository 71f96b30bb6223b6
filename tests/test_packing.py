import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vsraq_plugin.gptq import HessianAccumulator, gptq_quantize
from vsraq_plugin.packing import dequantize_packed, pack_codes, pack_linear, unpack_codes, unpack_linear


def _autogptq_layout(intweight: np.ndarray, bits: int) -> np.ndarray:
    """The community GPTQ v1 layout, written out word by word as AutoGPTQ's packer lays it down.

    2/4/8 bits: word r holds codes r*32/bits ... with code j at bit offset bits*j. 3 bits: 32 codes fill
    3 words; codes 10 and 21 straddle words (low bits at the top of one word, high bits at the bottom of
    the next).
    """
    intweight = intweight.astype(np.uint32)
    rows = intweight.shape[0] // 32 * bits
    out = np.zeros((rows, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < rows:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                out[row] |= intweight[j] << (3 * (j - i))
            i += 10
            out[row] |= intweight[i] << 30
            row += 1
            out[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= intweight[i] << 31
            row += 1
            out[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return out.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_byte_compatible_with_community_layout(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(96, 7))
    ours = pack_codes(torch.from_numpy(codes), bits).numpy()
    np.testing.assert_array_equal(ours, _autogptq_layout(codes, bits))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_whole_word_packer_equals_the_bit_stream(bits):
    """The whole-word packer (2/4/8 bits, whole words: every real layer) against the general bit-stream packer,
    bit for bit, on codes that reach the grid's top (the top code sets the word's sign bit) and its bottom; the
    public entry takes the whole-word path there and the bit stream elsewhere."""
    from vsraq_plugin import packing

    g = torch.Generator().manual_seed(bits)
    per = 32 // bits
    codes = torch.randint(0, 2**bits, (per * 24, 11), generator=g)
    codes[-1] = 2**bits - 1  # the last code of every column: the top field of its last word
    codes[0] = 0
    fast = packing._pack_words(codes, bits)
    assert (fast < 0).any()  # sign bits were set
    assert torch.equal(fast, packing._pack_stream(codes, bits))
    assert torch.equal(pack_codes(codes.float(), bits), fast)  # float codes, as the solver holds them
    ragged = codes[:-1]  # not whole words: the bit stream, zero-padded
    assert torch.equal(pack_codes(ragged, bits), packing._pack_stream(ragged, bits))


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 90), m=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_pack_unpack_identity(bits, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, m), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == ((n * bits + 31) // 32, m)
    assert torch.equal(unpack_codes(packed, n, bits), codes)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]), out_f=st.integers(1, 40), groups=st.integers(1, 3), seed=st.integers(0, 2**16)
)
def test_linear_round_trip_including_zero_point_zero(bits, out_f, groups, seed):
    g = torch.Generator().manual_seed(seed)
    in_f = 8 * groups
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    zeros = torch.randint(0, 2**bits, (out_f, groups), generator=g)
    zeros[0, 0] = 0  # stored as the masked -1 in v1
    scales = torch.rand(out_f, groups, generator=g).half().float()
    g_idx = torch.arange(in_f) // 8
    p = pack_linear(codes, scales, zeros, g_idx, bits)
    assert p.qzeros.shape == (groups, (out_f * bits + 31) // 32) and p.scales.dtype == torch.float16
    c2, z2 = unpack_linear(p.qweight, p.qzeros, bits, in_f, out_f)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros)


def test_qzeros_store_zero_minus_one():
    zeros = torch.full((8, 1), 8)  # 4-bit symmetric zero point
    p = pack_linear(torch.zeros(8, 8, dtype=torch.long), torch.ones(8, 1), zeros, torch.zeros(8), 4)
    assert p.qzeros.item() == 0x77777777  # seven in every nibble, as every GPTQ v1 checkpoint has


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_packed_layer_dequantizes_to_solver_weight(bits, desc_act):
    x = torch.randn(400, 64) @ torch.randn(64, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    W = torch.randn(1, 40, 64)
    qw, _, _ = gptq_quantize(W, acc.H, bits, group_size=32, sym=False, desc_act=desc_act)
    p = pack_linear(qw.codes[0], qw.scales[0], qw.zeros[0], qw.g_idx[0], bits)
    deq = dequantize_packed(p.qweight, p.qzeros, p.scales, p.g_idx, bits, 64, 40)
    assert torch.equal(deq, qw.weight[0])


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"GPTQ v1 supports"):
        pack_codes(torch.zeros(4, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_codes(torch.full((4, 4), 16), 4)
    with pytest.raises(ValueError, match=r"need"):
        unpack_codes(torch.zeros(3, 4, dtype=torch.int32), 32, 4)
