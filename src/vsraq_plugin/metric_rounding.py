"""Rounding a column under a low-rank output metric (DESIGN 3.5f): the fast path of the metric solve.

The residual writers' metric is ``M = I + lambda * A / ||A||`` with ``A`` of rank at most E - 1 (every boundary
direction is a difference of two router rows), so ``M = I + G G^T`` with ``G`` ``(rows, k)``, k small, and

    e^T M e = ||e||^2 + ||G^T e||^2.

GPTQ's column loop and its compensation of the later columns do not depend on ``M`` (DESIGN 3.5b); ``M`` only
changes how each column is rounded across its rows. ``round_column`` does that rounding vectorised over rows
and over a batch of matrices, in two stages:

1. a start: the better (per matrix) of nearest rounding and a *blocked* nearest plane: the rows in a few blocks,
   each block rounded at once at the rows' continuous optimum given the blocks before it,
   ``w + G_blk (I + K_a)^-1 z_a`` (``z_a`` the running ``G^T e`` of the earlier rows, ``K_a`` the Gram of ``G``'s
   rows from ``a`` on): Babai's nearest plane with its feedback refreshed once per block instead of once per row;
2. a few coordinate-descent passes. In a pass every row's best move (its code by +-1) and the exact change of
   the objective it brings are computed in O(k) from ``z = G^T e``; the moves with at least ``tau`` times the
   largest gain are tried together, their joint change computed exactly, and kept when it lowers the
   objective, else only the single best move is made.

The objective falls strictly with every move, so the result is never worse than nearest rounding (nor than the
blocked nearest plane).

``nearest_plane`` is the exact sequential alternative (the rounding of the tiled wavefront solve): Babai's
nearest plane over the rows, with the feedback a row receives from the earlier rows of its column written
through the semiseparable structure as ``p_r^T z_r`` (``z_r`` the k-dimensional running ``G^T e`` of the rows
before it). It is sequential over the rows (a block of one row above), so it serves as a reference here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .kernels import triton_available
from .quantizer import nearest_codes

# Coordinate-descent passes per column and the share of the best gain a move needs to join a pass's joint move.
# Measured on 2048-row columns (ranks 8..128, W3/W4): from nearest rounding, 4 passes reach the exact
# nearest-plane objective within ~0.5-1 %; tau = 0.75 beat 0.3, 0.5 and 0.9 at every pass count (lower: the
# joint move overshoots; higher: too few moves per pass). From the blocked nearest plane 2 passes do better.
DEFAULT_PASSES = 2
DEFAULT_TAU = 0.75
# The descent starts from the better of nearest rounding and a blocked nearest plane over this many row blocks
# (0: from nearest rounding only). Measured in the GPTQ solve (2048 x 768, 8 experts, ranks 8 and 64):
# 8 blocks + 2 passes reached 0.999-1.008 x the exact solve's objective at 1.7x GPTQ's time, where nearest +
# 4 passes reached 1.004-1.036 at the same time; 16 blocks + 2 passes 0.999 at 2.0x.
DEFAULT_BLOCKS = 8
# A metric direction whose weight (eigenvalue of G G^T) is below this, relative to the identity part, is
# dropped: it moves ``e^T M e`` by less than that fraction of ``||e||^2``.
DEFAULT_DROP = 1e-3
# Pivots ``low_rank_factor`` may take beyond ``max_rank`` before it gives up: a float32 metric of exactly
# ``max_rank`` directions (2048 rows, weights up to lambda = 128) left 1-2 pivots of weight 1e-5..5e-4 above the
# pivot tolerance, which sent the solve to the exact path (5-20x slower) at real widths.
RANK_SLACK = 16


def low_rank_factor(
    M: torch.Tensor, max_rank: int, drop: float = DEFAULT_DROP, rel_tol: float = 1e-6
) -> torch.Tensor | None:
    """``G`` ``(N, rows, k)`` with ``M ~= I + G G^T`` for a batch of metrics ``M`` ``(N, rows, rows)``, or ``None``
    when ``M - I`` has more than ``max_rank`` directions above the tolerance (then use the exact solve).

    Pivoted Cholesky of ``M - I`` in float64 (O(rows k^2), reading only k columns of each metric), stopped when the
    largest remaining diagonal falls below ``rel_tol`` times the largest diagonal; then the columns are turned into
    the eigenvectors of ``G G^T`` (an eigen-solve of the k x k Gram) and those of weight below ``drop`` dropped.
    A metric shared by the batch (``M.expand(N, ...)``, stride 0) is factorised once and ``G`` comes back expanded.
    ``M - I`` must be positive semidefinite (the metric never discounts a direction); ``M = I`` gives ``k = 0``.
    A metric cut to exactly ``max_rank`` directions (``vsraq.top_factor``) is stored in float32, whose rounding
    leaves a few more pivots above the tolerance: up to ``RANK_SLACK`` of them are taken and then dropped with the
    weak directions, so the limit is on the directions kept, not on the pivots.
    """
    N, R, _ = M.shape
    if N > 1 and M.stride(0) == 0:
        G = low_rank_factor(M[:1], max_rank, drop, rel_tol)
        return None if G is None else G.expand(N, *G.shape[1:])
    diag = torch.diagonal(M, dim1=-2, dim2=-1).double() - 1  # M - I is never formed: k of its columns are read
    tol = rel_tol * diag.amax(-1).clamp(min=1.0)  # (N,)
    cap = min(max_rank + RANK_SLACK, R)
    L = torch.zeros(N, R, cap, dtype=torch.float64, device=M.device)
    batch = torch.arange(N, device=M.device)
    k = 0
    while True:
        dmax, piv = diag.max(-1)
        live = dmax > tol
        if not bool(live.any()):
            break
        if k == cap:
            return None  # more directions than allowed are above the tolerance
        col = M[batch, piv, :].double()  # row = column (symmetric), contiguous
        col[batch, piv] -= 1
        col -= torch.einsum("nrj,nj->nr", L[:, :, :k], L[batch, piv, :k])
        L[:, :, k] = torch.where(live[:, None], col / dmax.clamp(min=1e-300).sqrt()[:, None], 0.0)
        diag -= L[:, :, k] ** 2
        diag[batch, piv] = torch.where(live, 0.0, diag[batch, piv])  # exactly 0: never chosen again
        k += 1
    if k == 0:
        return L[:, :, :0].float()
    L = L[:, :, :k]
    # Orthogonal directions, strongest first; drop the weak ones.
    lam, V = torch.linalg.eigh(L.transpose(1, 2) @ L)  # ascending
    keep = int((lam > drop).sum(-1).max())
    if keep > max_rank:
        return None
    G = (L @ V.flip(-1)[:, :, :keep]).float()
    return G


def _matvec(x: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``x @ G`` per matrix: ``x`` ``(N, R)``, ``G`` ``(N, R, k)`` -> ``(N, k)``; a shared (expanded) ``G`` is one
    matrix product."""
    if G.shape[0] > 1 and G.stride(0) == 0:
        return x @ G[0]
    return torch.bmm(x[:, None, :], G)[:, 0]


def _rmatvec(z: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``G z`` per matrix: ``z`` ``(N, k)`` -> ``(N, R)``."""
    if G.shape[0] > 1 and G.stride(0) == 0:
        return z @ G[0].T
    return torch.bmm(G, z[:, :, None])[..., 0]


def metric_objective(e: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``e^T (I + G G^T) e`` per matrix (``e`` ``(N, R)``)."""
    return (e * e).sum(-1) + _matvec(e, G).pow(2).sum(-1)


@dataclass(frozen=True, eq=False)
class Plan:
    """What ``round_column`` needs of ``G`` beyond ``G`` itself, computed once per solve: the blocked nearest
    plane's row blocks (``sizes``, empty for a start from nearest rounding) with, per block, its feedback rows
    ``F = G_[a,b) (I + K_a)^-1`` and its rows of ``G``, as ready views (a column then takes no slicing: on the
    CPU a view costs as much as a small operation, and a column takes some fifty of them)."""

    shared: bool  # one G for the batch (shared or a batch of one): plain matrix products in the plane
    gt: torch.Tensor | None  # G^T (k, R) of a G shared by a batch of several, for the passes' c = e + G z
    sizes: list[int]
    feed: list[torch.Tensor]  # per block: F^T (k, b) when shared, else F (N, b, k); views of `stacked`
    rows: list[torch.Tensor]  # per block: G (b, k) when shared, else (N, b, k)
    stacked: torch.Tensor | None = None  # the blocks' F by row, (1 or N, R, k): the fused kernel's feed


def _is_shared(G: torch.Tensor) -> bool:
    return G.shape[0] == 1 or G.stride(0) == 0


def make_plan(G: torch.Tensor, block: int | None) -> Plan:
    """``round_column``'s plan for ``G``: the blocked nearest plane over row blocks of ``block`` rows (the start
    of the descent, module docstring), or ``block=None`` for a start from nearest rounding. Block ``[a, b)``
    rounds ``w + G_[a,b) (I + K_a)^-1 z_a`` at once, with ``K_a = G_{>=a}^T G_{>=a}`` and ``z_a`` the running
    ``G^T e`` of the rows before it: the rows' continuous optimum with the earlier rows fixed (the nearest plane's
    fed value, exact for a block of one row)."""
    R, k = G.shape[-2], G.shape[-1]
    shared = _is_shared(G)
    gt = G[0].T if G.shape[0] > 1 and G.stride(0) == 0 else None  # (a batch of one: batched products, as before)
    if block is None or k == 0:
        return Plan(shared, gt, [], [], [])
    Gs = G[:1] if shared else G
    bounds = [(a, min(a + block, R)) for a in range(0, R, block)]
    Gd = Gs.double()
    grams = torch.stack([Gd[:, a:b].transpose(1, 2) @ Gd[:, a:b] for a, b in bounds])  # (C, N, k, k)
    K = grams.flip(0).cumsum(0).flip(0)
    eye = torch.eye(k, dtype=torch.float64, device=G.device)
    # (I + K)^-1 through its Cholesky factor (I + K is positive definite). Not linalg.inv: its batched LU on the
    # CPU fails with more than one thread under MKL (pytorch/pytorch#141358: "Pivots given to lu_solve ...").
    P = torch.cholesky_inverse(torch.linalg.cholesky(eye + K))
    sizes = [b - a for a, b in bounds]
    # One (N, R, k) tensor of every block's F (the fused kernel reads it whole); the blocks are views of it.
    stacked = torch.cat([(Gd[:, a:b] @ P[i]).to(G.dtype) for i, (a, b) in enumerate(bounds)], dim=1)
    if shared:
        feed, rows = [f.T for f in stacked[0].split(sizes)], [G[0, a:b] for a, b in bounds]
        return Plan(True, gt, sizes, feed, rows, stacked)
    return Plan(False, gt, sizes, list(stacked.split(sizes, 1)), [G[:, a:b] for a, b in bounds], stacked)


def default_plan(G: torch.Tensor) -> Plan | None:
    """The start the fast metric solve uses: the blocked nearest plane over ``DEFAULT_BLOCKS`` row blocks (one row
    per block when there are fewer rows: the exact nearest plane), or a start from nearest rounding; ``None``
    when ``G`` has no direction."""
    if not G.shape[-1]:
        return None
    return make_plan(G, -(-G.shape[-2] // DEFAULT_BLOCKS) if DEFAULT_BLOCKS else None)


@dataclass(frozen=True, eq=False)
class Grid:
    """A quantization grid as ``round_column`` uses it, computed once per group (the grid changes per group, not
    per column): codes are held centred, ``code - zero``, in ``[lo, hi] = [-zero, maxq - zero]``; a move of a
    row costs ``neg_cost = -s^2 M_rr`` against ``scale2 = 2 s`` times its half-gradient; and the plan's row
    blocks of ``scale``, ``lo`` and ``hi``."""

    lo: torch.Tensor
    hi: torch.Tensor
    neg_cost: torch.Tensor
    scale2: torch.Tensor
    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def grid_terms(scale: torch.Tensor, zero: torch.Tensor, maxq: int, Gsq: torch.Tensor, plan: Plan | None = None) -> Grid:
    """``round_column``'s view of the grid ``scale``/``zero`` (``Grid``); ``Gsq`` the row norms ``||g_r||^2``."""
    lo = -zero
    hi = maxq - zero
    blocks = []
    if plan is not None and plan.sizes:
        blocks = list(zip(scale.split(plan.sizes, 1), lo.split(plan.sizes, 1), hi.split(plan.sizes, 1), strict=True))
    return Grid(lo, hi, -scale * scale * (1 + Gsq), 2 * scale, blocks)


def _blocked_nearest_plane(w: torch.Tensor, grid: Grid, plan: Plan):
    """Centred codes of the blocked nearest plane (``make_plan``), and the column's ``e`` and ``G^T e``."""
    z = w.new_zeros(w.shape[0], plan.rows[0].shape[-1])
    code = torch.empty_like(w)
    e = torch.empty_like(w)
    parts = zip(w.split(plan.sizes, 1), code.split(plan.sizes, 1), e.split(plan.sizes, 1), grid.blocks, plan.feed,
                plan.rows, strict=True)  # fmt: skip
    for wb, cb, eb, (s, lo, hi), F, Gb in parts:
        fed = torch.addmm(wb, z, F) if plan.shared else wb + torch.bmm(F, z[:, :, None])[..., 0]
        torch.div(fed, s, out=cb).round_().clamp_(lo, hi)  # nearest_codes(fed, ...) - zero, in place
        torch.addcmul(wb, s, cb, value=-1, out=eb)
        z = torch.addmm(z, eb, Gb) if plan.shared else z + torch.bmm(eb[:, None, :], Gb)[:, 0]
    return code, e, z


def _sparse_matvec(x: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``_matvec`` for an ``x`` that is zero on most rows (a pass's moves: well under 1 % of the rows at real
    widths): only the rows some matrix moves are read from ``G``."""
    rows = x.abs().amax(0).nonzero().flatten()
    if rows.numel() * 8 > x.shape[-1]:
        return _matvec(x, G)
    if _is_shared(G):
        return x[:, rows] @ G[0, rows]
    return torch.bmm(x[:, None, rows], G[:, rows])[:, 0]


def _kernel_by_default(w: torch.Tensor) -> bool:
    """Whether ``round_column`` takes the one-launch kernel when not told: a CUDA column, with
    ``VSRAQ_ROUND_KERNEL=1`` (opt-in until a GPU run shows it pays) and triton installed."""
    return w.is_cuda and os.environ.get("VSRAQ_ROUND_KERNEL", "") == "1" and triton_available()


def _best_move_where(single, step, de, dz, gain, d, best, scale, G):
    """``round_column``'s fall-back to the best move alone, for the matrices flagged ``single``, as masked selects
    over the whole batch (no host read of which matrices): the same values as its indexed form."""
    at = gain.argmax(-1, keepdim=True)  # (N, 1)
    alone = torch.zeros_like(step).scatter_(1, at, d.gather(1, at) * (best > 0).to(d.dtype)[:, None])
    keep = single[:, None]
    step = torch.where(keep, alone, step)
    de = torch.where(keep, alone * scale, de)
    g_at = G[torch.arange(G.shape[0], device=G.device), at[:, 0]]  # (N, k): row ``at`` of each matrix's G
    dz = torch.where(keep, de.gather(1, at) * g_at, dz)
    return step, de, dz


def round_column(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    G: torch.Tensor,
    Gsq: torch.Tensor | None = None,
    passes: int | None = None,
    tau: float | None = None,
    fed: bool = False,
    plan: Plan | None = None,
    grid: Grid | None = None,
    sync_free: bool | None = None,
    kernel: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Codes ``(N, R)`` (float, in ``[0, maxq]``) of a column ``w`` ``(N, R)`` on the grid ``scale``/``zero``
    ``(N, R)``, that lower ``e^T (I + G G^T) e``, ``e = w - scale * (code - zero)``, by coordinate descent
    (module docstring) from nearest rounding, or, given a ``plan`` with row blocks (``make_plan``), from the
    better of nearest rounding and the blocked nearest plane. ``Gsq``: the row norms ``||g_r||^2`` ``(N, R)``, if
    precomputed; ``grid``: ``grid_terms(scale, zero, maxq, Gsq, plan)``, if precomputed (once per group, not per
    column). ``passes``/``tau``: ``DEFAULT_PASSES``/``DEFAULT_TAU`` when not given. With ``k = 0``, or
    ``passes = 0`` and no row blocks, this is ``quantizer.quantize`` exactly.

    ``fed``: also return the values the codes are the nearest rounding of (``QuantizedWeight.prequant``, where
    refinement starts): row r's continuous optimum with every other row at its code, ``q_r + (M e)_r / M_rr`` (the
    analogue of the nearest plane's fed value), or the grid point itself where that would round elsewhere (a row
    whose best move the last pass left undone).

    ``sync_free`` (default: on a CUDA device): no decision on the host. Every pass runs (a finished pass moves
    nothing), the moves' ``G^T de`` is a dense product, and the single-move fall-back is a masked select. On the
    CPU, skipping finished passes and reading only the moved rows of ``G`` pays. On a GPU each of those reads
    waits for the device: three or more waits per column behind its ~170 queued operations. The two give the
    same codes, but for the order of the sums in the moves' ``G^T de``.

    ``kernel``: the whole rounding as one Triton launch (``kernels.metric_round``; not with ``fed``). Default: on
    a CUDA device when ``VSRAQ_ROUND_KERNEL=1``. It is off by default until a GPU run shows it pays (its speed
    has not been measured; under the interpreter it gives the same codes, tested)."""
    passes = DEFAULT_PASSES if passes is None else passes
    sync_free = w.is_cuda if sync_free is None else sync_free
    tau = DEFAULT_TAU if tau is None else tau
    blocked = plan is not None and bool(plan.sizes)
    if G.shape[-1] == 0 or (passes <= 0 and not blocked):
        code = nearest_codes(w, scale, zero, maxq)
        return (code, w) if fed else code
    if plan is None:
        plan = make_plan(G, None)
    if Gsq is None:
        Gsq = G.pow(2).sum(-1)
    if grid is None:
        grid = grid_terms(scale, zero, maxq, Gsq, plan)
    if kernel is None:
        kernel = _kernel_by_default(w)
    if kernel and not fed:
        from .kernels.metric_round import round_column_fused

        feed = None if not blocked else plan.stacked.expand(G.shape[0], *plan.stacked.shape[1:])
        code = round_column_fused(
            w, *(t.contiguous() for t in (scale, grid.lo, grid.hi, grid.neg_cost)), G, feed,
            plan.sizes[0] if blocked else 0, passes, tau,
        )  # fmt: skip
        return code.add_(zero)
    # Codes held centred (code - zero): integers either way, so the same values as nearest_codes' and one
    # operation less per use.
    code = torch.div(w, scale).round_().clamp_(grid.lo, grid.hi)
    e = torch.addcmul(w, scale, code, value=-1)
    z = _matvec(e, G)
    if blocked:  # start from the better of the two, per matrix: never worse than nearest rounding
        code_p, e_p, z_p = _blocked_nearest_plane(w, grid, plan)
        f_n = torch.linalg.vecdot(e, e) + torch.linalg.vecdot(z, z)
        f_p = torch.linalg.vecdot(e_p, e_p) + torch.linalg.vecdot(z_p, z_p)
        use = (f_p < f_n).to(w.dtype)[:, None]
        code = code.add_(code_p.sub_(code).mul_(use))
        e = e.add_(e_p.sub_(e).mul_(use))
        z = z.add_(z_p.sub_(z).mul_(use))
    neg_cost, scale2 = grid.neg_cost, grid.scale2
    tiny = torch.finfo(w.dtype).tiny
    # Float arithmetic only: masks as 0/1 floats (boolean masks, torch.where and masked_fill cost 5-20x a float
    # operation on the CPU at these sizes).
    for _ in range(passes):
        # c = M e, the objective's half-gradient. Moving row r's code by d_r = +-1 changes the objective by
        # -2 s_r d_r c_r + s_r^2 M_rr: the best move is d_r = sign(c_r), if it stays on the grid (else d_r = 0).
        c = torch.addmm(e, z, plan.gt) if plan.gt is not None else e + _rmatvec(z, G)
        d = torch.sign(c).add_(code).clamp_(grid.lo, grid.hi).sub_(code)
        gain = torch.addcmul(scale2 * c, neg_cost, d).mul_(d)  # d (2 s c - s^2 M_rr d): 0 where d = 0
        best = gain.amax(-1)
        if not sync_free and not bool((best > 0).any()):
            break
        # The moves of at least tau x the best gain together: their exact joint change of the objective,
        # -2 de.c + de.de + |G^T de|^2 (e -> e - de); kept when it is negative, else the best move alone
        # (its change is -best < 0).
        threshold = (tau * best).clamp_(min=tiny)[:, None]
        step = (gain - threshold).sign_().clamp_(min=0).mul_(d)  # gain = threshold only at tau = 1: the best
        de = step * scale
        dz = _matvec(de, G) if sync_free else _sparse_matvec(de, G)
        change = torch.linalg.vecdot(de, torch.add(de, c, alpha=-2)) + torch.linalg.vecdot(dz, dz)
        single = change >= 0
        if sync_free:
            step, de, dz = _best_move_where(single, step, de, dz, gain, d, best, scale, G)
        elif bool(single.any()):
            rows = single.nonzero()[:, 0]
            at = gain[rows].argmax(-1)
            alone = torch.zeros_like(step[rows])
            alone[torch.arange(rows.numel(), device=w.device), at] = d[rows, at] * (best[rows] > 0)
            step[rows] = alone
            de[rows] = alone * scale[rows]
            dz[rows] = de[rows, at][:, None] * G[rows, at]
        code += step
        e -= de
        z -= dz
    code = code.add_(zero)
    if not fed:
        return code
    q = scale * (code - zero)
    c = torch.addmm(e, z, plan.gt) if plan.gt is not None else e + _rmatvec(z, G)
    u = q + c / (1 + Gsq)
    u = torch.where(nearest_codes(u, scale, zero, maxq) == code, u, q)
    return code, u


def nearest_plane_vectors(G: torch.Tensor) -> torch.Tensor:
    """``p_r = (I + K_r)^-1 g_r`` ``(N, R, k)``, ``K_r = sum_{s >= r} g_s g_s^T``: the feedback weights of the
    semiseparable nearest plane (float64)."""
    Gd = G.double()
    outer = Gd[..., :, None] * Gd[..., None, :]  # (N, R, k, k)
    K = outer.flip(-3).cumsum(-3).flip(-3)
    eye = torch.eye(G.shape[-1], dtype=torch.float64, device=G.device)
    return torch.cholesky_solve(Gd[..., None], torch.linalg.cholesky(eye + K))[..., 0]  # not LU: see make_plan


def nearest_plane(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, G: torch.Tensor, P: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes of Babai's nearest plane under ``M = I + G G^T``, rows in order (the rounding the exact wavefront
    solve does, through the Cholesky factor of ``M^-1``): row r rounds ``w_r + p_r^T z_r`` with ``z_r`` the
    running ``G^T e`` of rows ``< r`` — the continuous optimum of row r once the earlier rows are fixed and the
    later ones free. Sequential over the rows (O(R k) per column); a reference, batched over matrices."""
    if P is None:
        P = nearest_plane_vectors(G)
    N, R = w.shape
    wd, sd, zd, Gd = w.double(), scale.double(), zero.double(), G.double()
    z = torch.zeros(N, G.shape[-1], dtype=torch.float64, device=w.device)
    code = torch.empty_like(wd)
    for r in range(R):
        fed = wd[:, r] + (P[:, r] * z).sum(-1)
        code[:, r] = nearest_codes(fed, sd[:, r], zd[:, r], maxq)
        z += (wd[:, r] - sd[:, r] * (code[:, r] - zd[:, r]))[:, None] * Gd[:, r]
    return code.to(w.dtype)


__all__ = [
    "DEFAULT_BLOCKS",
    "DEFAULT_PASSES",
    "DEFAULT_TAU",
    "RANK_SLACK",
    "Grid",
    "Plan",
    "default_plan",
    "grid_terms",
    "low_rank_factor",
    "make_plan",
    "metric_objective",
    "nearest_plane",
    "nearest_plane_vectors",
    "round_column",
]
