"""The fast metric rounding (DESIGN 3.5f, ``metric_rounding``): a column rounded across its rows under a low-rank
metric ``M = I + G G^T``, against brute force, nearest rounding and the exact nearest plane; the low-rank factor
of a dense metric; and the fast metric solve inside GPTQ (falls back to the exact one above the rank cap)."""

from __future__ import annotations

import itertools

import pytest
import torch

from vsraq_plugin import gptq as gptq_module
from vsraq_plugin.config import ConfigError, QuantConfig
from vsraq_plugin.gptq import gptq_quantize
from vsraq_plugin.metric_rounding import (
    default_plan,
    grid_terms,
    low_rank_factor,
    metric_objective,
    nearest_plane,
    round_column,
)
from vsraq_plugin.quantizer import quantize

F64 = torch.float64


def _column(seed: int, R: int, k: int, bits: int, N: int = 1):
    """A column that overhangs the grid on both sides (clamped rows), per-row scales, a metric of rank k whose
    weight relative to the identity varies from weak to strong with the seed."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    G = torch.randn(N, R, k, dtype=F64, generator=g) * (0.3 + 2 * torch.rand(N, 1, 1, dtype=F64, generator=g))
    scale = 0.5 + torch.rand(N, R, dtype=F64, generator=g)
    zero = torch.full((N, R), float((maxq + 1) // 2), dtype=F64)
    w = (torch.rand(N, R, dtype=F64, generator=g) * (maxq + 1.4) - zero - 0.7) * scale
    return w, scale, zero, maxq, G


def _objective(w, scale, zero, G, codes):
    return metric_objective(w - scale * (codes - zero), G)


def test_fast_rounding_against_brute_force():
    """6 rows on a 2-bit grid (all 4^6 code vectors enumerated), 200 metrics of rank 1-3: the fast rounding as the
    solver runs it (``default_plan``: with this few rows, blocks of one row, so it starts from the exact nearest
    plane or nearest rounding, whichever is better) is never worse than either, and reaches the global optimum
    in most cases; Babai's nearest plane (the exact solve's rounding) does in about half: neither is the global
    optimum by definition."""
    R, bits = 6, 2
    maxq = 2**bits - 1
    every = torch.tensor(list(itertools.product(range(maxq + 1), repeat=R)), dtype=F64)  # (4096, 6)
    optimal = plane_optimal = 0
    cases = 200
    for seed in range(cases):
        w, scale, zero, _, G = _column(seed, R, 1 + seed % 3, bits)
        best = metric_objective(w - scale * (every - zero), G.expand(every.shape[0], R, G.shape[-1])).min()
        f_near = _objective(w, scale, zero, G, quantize(w, scale, zero, bits))
        f_plane = _objective(w, scale, zero, G, nearest_plane(w, scale, zero, maxq, G))
        fast = round_column(w, scale, zero, maxq, G, plan=default_plan(G))
        assert ((fast >= 0) & (fast <= maxq) & (fast == fast.round())).all()
        f_fast = _objective(w, scale, zero, G, fast)
        assert f_fast <= f_near and f_fast <= f_plane, seed
        assert f_fast >= best * (1 - 1e-12), seed
        optimal += bool(f_fast <= best * (1 + 1e-12))
        plane_optimal += bool(f_plane <= best * (1 + 1e-12))
    assert optimal >= 0.75 * cases, (optimal, plane_optimal)
    assert optimal > plane_optimal, (optimal, plane_optimal)


@pytest.mark.parametrize(("R", "k", "bits"), [(64, 4, 3), (256, 16, 4), (512, 64, 2)])
def test_fast_rounding_descends(R, k, bits):
    """Each pass continues the previous ones and lowers the objective or stops: non-increasing in the number of
    passes from nearest rounding, strictly below it; from the solver's start (``default_plan``) never above
    nearest rounding and close to the exact nearest plane, with the metric at the pipeline's scale
    (``M = I + 32 A / ||A||``)."""
    w, scale, zero, maxq, G = _column(3, R, k, bits, N=4)
    G = G * (32 / torch.linalg.matrix_norm(G, ord=2) ** 2).sqrt()[:, None, None]  # ||G G^T|| = 32, the default
    nearest = quantize(w, scale, zero, bits)
    f_near = _objective(w, scale, zero, G, nearest)
    assert torch.equal(round_column(w, scale, zero, maxq, G, passes=0), nearest)
    previous = f_near
    for passes in (1, 2, 4, 8):
        f = _objective(w, scale, zero, G, round_column(w, scale, zero, maxq, G, passes=passes))
        assert (f <= previous).all(), passes
        previous = f
    assert (previous < f_near).all()
    plane = _objective(w, scale, zero, G, nearest_plane(w, scale, zero, maxq, G))
    codes = round_column(w, scale, zero, maxq, G, plan=default_plan(G))
    fast = _objective(w, scale, zero, G, codes)
    assert (fast <= f_near).all()
    # The solver hands in the grid terms once per group: the same codes as computing them per column.
    terms = grid_terms(scale, zero, maxq, G.pow(2).sum(-1), default_plan(G))
    assert torch.equal(round_column(w, scale, zero, maxq, G, plan=default_plan(G), grid=terms), codes)
    assert fast.sum() <= 1.05 * plane.sum(), fast / plane


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("fed", [False, True])
def test_sync_free_rounding_is_the_same_rounding(shared, fed, monkeypatch):
    """The GPU form of the descent (``sync_free``: every pass runs, dense products, masked fall-back) against the
    CPU form, on a batch where some matrices take the single-move fall-back, some finish early and some use every
    pass: with the CPU form's sparse product made dense, the same codes and fed values bit for bit; as shipped
    (sums in another order), the same codes on nearly every row and the same objective to float32 rounding."""
    import vsraq_plugin.metric_rounding as mr

    w, scale, zero, maxq, G = _column(11, 384, 12, 3, N=8)
    w, scale, zero, G = w.float(), scale.float(), zero.float(), G.float()
    G[::3] *= 30  # strong metrics: joint moves overshoot and the single best move is taken instead
    G[1::3] *= 1e-3  # weak metrics: nearest rounding is already optimal, the passes stop at once
    if shared:
        G = G[:1].expand_as(G)
    plan = default_plan(G)
    fallbacks = []
    real = mr._best_move_where

    def spy(single, step, de, dz, gain, d, best, *rest):
        fallbacks.append(single & (best > 0))  # a matrix that moves, and by its single best move
        return real(single, step, de, dz, gain, d, best, *rest)

    monkeypatch.setattr(mr, "_best_move_where", spy)
    kw = dict(plan=plan, passes=6, fed=fed)
    free = round_column(w, scale, zero, maxq, G, sync_free=True, **kw)
    host = round_column(w, scale, zero, maxq, G, sync_free=False, **kw)
    codes_free, codes_host = (free[0], host[0]) if fed else (free, host)
    assert codes_free.shape == codes_host.shape
    agree = (codes_free == codes_host).double().mean()
    assert agree >= 0.999, agree
    f_free, f_host = _objective(w, scale, zero, G, codes_free), _objective(w, scale, zero, G, codes_host)
    torch.testing.assert_close(f_free, f_host, rtol=1e-5, atol=0)
    # Every pass ran, and a real fall-back (a matrix still moving, by its best move alone) happened, though not
    # for every matrix in every pass.
    assert len(fallbacks) == 6
    taken = torch.stack(fallbacks)
    assert taken.any() and not taken.all()
    with monkeypatch.context() as m:
        m.setattr(mr, "_sparse_matvec", mr._matvec)
        host = round_column(w, scale, zero, maxq, G, sync_free=False, **kw)
    for a, b in zip(free if fed else (free,), host if fed else (host,), strict=True):
        assert torch.equal(a, b)


def test_plans_take_no_lu_factorisation(monkeypatch):
    """The plan's feedback rows ``G_[a,b) (I + K_a)^-1`` and the nearest plane's ``(I + K_r)^-1 g_r`` come from
    Cholesky factors, never from an LU: MKL's batched LU fails on the CPU with more than one thread
    (pytorch/pytorch#141358), which stopped ``vsraq quantize --threads 2`` in ``make_plan``. Same values as the
    inverse in float64."""
    import vsraq_plugin.metric_rounding as mr

    g = torch.Generator().manual_seed(4)
    G = torch.randn(3, 96, 5, generator=g)
    Gd = G.double()
    K = [Gd[:, a:].transpose(1, 2) @ Gd[:, a:] for a in range(0, 96, 12)]  # blocks of 12 rows (96 / 8)
    want = [
        Gd[:, a : a + 12] @ torch.linalg.inv(torch.eye(5, dtype=F64) + K[i]) for i, a in enumerate(range(0, 96, 12))
    ]
    outer = Gd[..., :, None] * Gd[..., None, :]
    Kr = outer.flip(-3).cumsum(-3).flip(-3)
    want_p = (torch.linalg.inv(torch.eye(5, dtype=F64) + Kr) @ Gd[..., None])[..., 0]

    def no_lu(*args, **kwargs):
        raise AssertionError("an LU factorisation was asked for")

    for name in ("inv", "inv_ex", "solve", "solve_ex", "lu_factor", "lu_factor_ex", "lu"):
        monkeypatch.setattr(torch.linalg, name, no_lu)
    plan = default_plan(G)
    assert plan.sizes == [12] * 8
    for F, ref in zip(plan.feed, want, strict=True):
        torch.testing.assert_close(F.double(), ref, rtol=1e-5, atol=1e-7)  # F is float32, as G
    torch.testing.assert_close(mr.nearest_plane_vectors(G), want_p, rtol=1e-10, atol=1e-12)


def _babai_cholesky(w, scale, zero, maxq, M):
    """Nearest plane through the upper Cholesky factor of ``M^-1``: the exact metric solve's rounding of one column
    (``gptq._solve_tiles``, and the scalar recursion of test_gptq)."""
    Minv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(M)), upper=True)
    fed = w.clone()
    codes = torch.empty_like(w)
    for r in range(w.shape[0]):
        codes[r] = torch.clamp(torch.round(fed[r] / scale[r]) + zero[r], 0, maxq)
        fed[r + 1 :] -= (fed[r] - scale[r] * (codes[r] - zero[r])) / Minv[r, r] * Minv[r, r + 1 :]
    return codes


@pytest.mark.parametrize("shared", [False, True])
def test_fast_rounding_start_is_chosen_per_matrix(shared):
    """A matrix's codes do not depend on the other matrices of its batch (per matrix, the start is the better of
    nearest rounding and the blocked plane: in a batch some matrices take one and some the other); with a shared
    (expanded) ``G`` too. Strong and weak metrics, so that each start is kept somewhere."""
    import vsraq_plugin.metric_rounding as mr

    w, scale, zero, maxq, G = _column(5, 300, 6, 3, N=6)
    w, scale, zero, G = w.float(), scale.float(), zero.float(), G.float()
    G[3:] *= 1e-3  # weak metrics: the plane is nearest rounding there, and nearest rounding is kept
    if shared:
        G = G[:1].expand_as(G)
    batched = round_column(w, scale, zero, maxq, G, plan=default_plan(G))
    for n in range(w.shape[0]):
        one = round_column(w[n : n + 1], scale[n : n + 1], zero[n : n + 1], maxq, G[n : n + 1],
                           plan=default_plan(G[n : n + 1]))  # fmt: skip
        assert torch.equal(one[0], batched[n]), n
    if shared:
        return
    # The batch mixes the two starts (else the per-matrix choice would not be exercised).
    plan = default_plan(G)
    codes, _, _ = mr._blocked_nearest_plane(w, mr.grid_terms(scale, zero, maxq, G.pow(2).sum(-1), plan), plan)
    f_plane = _objective(w, scale, zero, G, codes + zero)
    f_near = _objective(w, scale, zero, G, quantize(w, scale, zero, 3))
    assert (f_plane < f_near).any() and (f_plane >= f_near).any(), (f_plane, f_near)


def test_semiseparable_nearest_plane_is_the_cholesky_recursion():
    """DESIGN 3.5f: the feedback a row receives from the earlier rows of its column is ``p_r^T z_r`` with ``z_r``
    the running ``G^T e``: the same codes as the recursion through the dense Cholesky factor of ``M^-1``."""
    for seed in range(6):
        w, scale, zero, maxq, G = _column(seed, 40, 1 + seed, 3, N=2)
        got = nearest_plane(w, scale, zero, maxq, G)
        for n in range(2):
            M = torch.eye(40, dtype=F64) + G[n] @ G[n].T
            assert torch.equal(got[n], _babai_cholesky(w[n], scale[n], zero[n], maxq, M)), (seed, n)


def test_low_rank_factor():
    """Pivoted Cholesky of ``M - I``: exact for a low-rank metric, one factorisation for a shared (expanded)
    metric, ``k = 0`` for the identity, weak directions dropped, ``None`` above the rank cap."""
    g = torch.Generator().manual_seed(0)
    U = torch.randn(3, 50, 5, dtype=F64, generator=g)
    M = torch.eye(50, dtype=F64) + U @ U.transpose(1, 2)
    G = low_rank_factor(M.float(), max_rank=16)
    assert G.shape == (3, 50, 5)
    torch.testing.assert_close(torch.eye(50) + G @ G.transpose(1, 2), M.float(), rtol=0, atol=1e-4)
    shared = low_rank_factor(M[0].float().expand(7, 50, 50), max_rank=16)
    assert shared.shape == (7, 50, 5) and shared.stride(0) == 0
    assert low_rank_factor(torch.eye(50).expand(4, 50, 50), max_rank=16).shape == (4, 50, 0)
    assert low_rank_factor(M.float(), max_rank=4) is None
    weak = torch.eye(50, dtype=F64) + U[0] @ U[0].T + 1e-5 * U[1, :, :2] @ U[1, :, :2].T
    assert low_rank_factor(weak.float()[None], max_rank=16).shape[-1] == 5  # the 1e-5 directions are dropped
    # A metric of exactly max_rank strong directions plus weak ones above the pivot tolerance (what float32
    # rounding leaves in a metric cut to max_rank directions, vsraq.top_factor): the weak pivots are taken and
    # dropped, the solve stays on the fast path (it went to the exact one, 5-20x slower, before RANK_SLACK).
    G = low_rank_factor(weak.float()[None], max_rank=5)
    assert G is not None and G.shape[-1] == 5
    torch.testing.assert_close(torch.eye(50) + G[0] @ G[0].T, weak.float(), rtol=0, atol=1e-3)


def test_a_metric_cut_to_the_rank_limit_stays_on_the_fast_path():
    """The pipeline cuts a deep metric to its top ``METRIC_RANK`` directions so that the solve stays on the fast
    path (``vsraq.top_factor``, README "The metric over depth"). Stored in float32, such a metric has float
    rounding above the pivot tolerance; this one (512 rows, seed 0, cut from a float32 matrix: more rounding than
    the pipeline's float64 factors leave, which did not trip it on 18 random spectra of 512-2048 rows) sent
    ``low_rank_factor`` to ``None``, i.e. the exact solve, before ``RANK_SLACK``. Now: exactly the limit's
    directions, and ``I + G G^T`` is the metric."""
    from vsraq_plugin.methods import METRIC_RANK
    from vsraq_plugin.vsraq import metric, top_directions

    R = torch.randn(300, 512, generator=torch.Generator().manual_seed(0))
    M = metric(top_directions(R.T @ R, METRIC_RANK), 32.0)[None]
    G = low_rank_factor(M, METRIC_RANK)
    assert G is not None and G.shape == (1, 512, METRIC_RANK)
    torch.testing.assert_close(torch.eye(512) + G[0] @ G[0].T, M[0], rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------- inside GPTQ
def _problem(B, R, d, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, R, d, generator=g)
    X = torch.randn(B, 300, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))
    return W, X.transpose(1, 2) @ X / 300


_ORDERS = {
    "plain": {},
    "static": {"static_groups": True},
    "desc_act": {"desc_act": True},
    "group_aware": {"act_group_aware": True},
}


@pytest.mark.parametrize("order", list(_ORDERS))
@pytest.mark.parametrize(("gs", "block"), [(8, 8), (8, 16), (-1, 128)])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_fast_identity_metric_equals_gptq(order, gs, block, scale):
    """The fast solve with ``M = I`` (rank 0) is plain GPTQ bit for bit, at any block size (it is GPTQ's column
    solver); with ``M = 2 I`` (full rank, every move costs) nearest rounding is already optimal, so too."""
    W, H = _problem(3, 12, 32, 1)
    kw = dict(_ORDERS[order], block_size=block)
    ref, err_ref, _ = gptq_quantize(W, H, 3, gs, **kw)
    got, err, _ = gptq_quantize(W, H, 3, gs, **kw, row_metric=scale * torch.eye(12).expand(3, 12, 12))
    for f in ("codes", "weight", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    assert torch.equal(err, err_ref)


def _metric_error(W, Q, H, M):
    E = (W - Q).double()
    return torch.einsum("brd,bde,bsd,brs->b", E, H.double(), E, M.double())


def test_fast_solve_close_to_exact():
    """On a batch with a shared rank-3 metric: the fast solve lowers the metric error against GPTQ about as much
    as the exact one (within 2 % of the exact error), and differs from GPTQ in many codes."""
    W, H = _problem(4, 48, 64, 2)
    U = torch.randn(48, 3, generator=torch.Generator().manual_seed(3))
    M = (torch.eye(48) + 32 * U @ U.T / torch.linalg.eigvalsh(U @ U.T)[-1]).expand(4, 48, 48)
    plain = gptq_quantize(W, H, 3, 16)[0]
    exact = gptq_quantize(W, H, 3, 16, block_size=16, row_metric=M, metric_solve="exact")[0]
    fast = gptq_quantize(W, H, 3, 16, block_size=16, row_metric=M, metric_solve="fast")[0]
    e_plain, e_exact, e_fast = (_metric_error(W, q.weight, H, M).sum() for q in (plain, exact, fast))
    assert e_exact < 0.95 * e_plain
    assert e_fast < 1.02 * e_exact, (e_fast / e_exact, e_exact / e_plain)
    assert (fast.codes != plain.codes).sum() > 50


def test_fast_solve_falls_back_to_exact_above_the_rank_cap(monkeypatch):
    """A metric with more directions than ``_METRIC_MAX_RANK`` takes the exact wavefront solve: same codes."""
    W, H = _problem(2, 12, 16, 4)
    U = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(5))
    M = torch.eye(12) + U @ U.transpose(1, 2)
    exact = gptq_quantize(W, H, 3, 8, block_size=8, row_metric=M, metric_solve="exact")[0]
    monkeypatch.setattr(gptq_module, "_METRIC_MAX_RANK", 2)
    fallback = gptq_quantize(W, H, 3, 8, block_size=8, row_metric=M, metric_solve="fast")[0]
    assert torch.equal(fallback.codes, exact.codes)


def test_metric_solve_is_validated():
    W, H = _problem(1, 4, 8, 0)
    with pytest.raises(ValueError, match="metric_solve"):
        gptq_quantize(W, H, 3, 8, row_metric=torch.eye(4)[None], metric_solve="approx")
    with pytest.raises(ConfigError, match="metric_solve"):
        QuantConfig(metric_solve="approx")
    assert QuantConfig().metric_solve == "fast"


def test_chunk_budgets_are_device_dependent():
    """CPU runs keep the cache-sized chunks; on a GPU the column loop takes whole batches and the factorisations
    a much larger budget (the CUDA path itself is not exercised here: no GPU in CI)."""
    assert gptq_module._budget(torch.device("cpu"), 1, 2) == 1
    assert gptq_module._budget(torch.device("cuda"), 1, 2) == 2
    assert gptq_module._CUDA_CHUNK_BYTES > gptq_module._CHUNK_BYTES
    assert gptq_module._CUDA_LA_CHUNK_BYTES > gptq_module._LA_CHUNK_BYTES


def test_fast_prequant_rounds_to_the_codes():
    """With ``keep_prequant`` the fast solve returns, per element, a value whose nearest rounding is its code (the
    row's conditional optimum, or the grid point): refinement starts from the solver's codes."""
    W, H = _problem(3, 24, 32, 6)
    U = torch.randn(24, 3, generator=torch.Generator().manual_seed(7))
    M = (torch.eye(24) + 32 * U @ U.T / torch.linalg.eigvalsh(U @ U.T)[-1]).expand(3, 24, 24)
    qw = gptq_quantize(W, H, 3, 8, block_size=8, row_metric=M, keep_prequant=True)[0]
    plain = gptq_quantize(W, H, 3, 8, block_size=8)[0]
    assert (qw.codes != plain.codes).any()
    g = qw.g_idx.long()[:, None, :].expand(-1, 24, -1)
    s, z = torch.gather(qw.scales, 2, g), torch.gather(qw.zeros.float(), 2, g)
    assert torch.equal(quantize(qw.prequant, s, z, 3), qw.codes.float())
    assert not torch.equal(qw.prequant, qw.weight)  # not just the grid points
