"""The fast metric rounding of one column (DESIGN 3.5f, ``metric_rounding.round_column``) as one Triton launch.

``round_column`` in torch is about 170 small operations per column. On a GPU that is launch-bound: on an H200
the metric solve of a Qwen3-30B-A3B-width layer spent 3 ms per column in it (README, "Measured on a GPU"), more
than all of GPTQ's own work. Here one program rounds one matrix's column. It sweeps the rows in chunks of
``BR``, carrying the k-dimensional running ``z = G^T e`` in registers. The steps are those of the torch form:
1. nearest rounding;
2. the blocked nearest plane (rows in blocks of ``PB``, each rounded at ``w + F z_a``, ``F`` the plan's
   feedback rows), kept per matrix when its objective is lower;
3. ``PASSES`` coordinate-descent passes: the best gain, the joint move of the rows within ``tau`` of it, and the
   single best move instead when the joint one does not lower the objective.

Divisions are correctly rounded (``div_rn``) and multiply-adds are not fused, as in torch's elementwise
operations. Sums run in another order than torch's, so a tie can still round the other way. Under the
interpreter the tests require the torch form's codes exactly; compiled, on nearly every row, with the
objective to float32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rint(x):
    """Round half to even, as ``torch.round``: ``floor(x + 0.5)`` except on exact halves, which go to the even
    neighbour (exact in float32 for the grid's range)."""
    f = tl.floor(x)
    diff = x - f
    odd = f - 2 * tl.floor(f * 0.5)  # 1.0 when f is odd
    return tl.where(diff > 0.5, f + 1, tl.where(diff < 0.5, f, f + odd))


@triton.jit
def _tile(ptr, rows, rmask, kk, kmask, stride_r, stride_k):
    """A chunk's rows of a ``(R, k)`` matrix (``G`` or the plan's feed), zero-padded to ``(BR, KP)``."""
    return tl.load(ptr + rows[:, None] * stride_r + kk[None, :] * stride_k, rmask[:, None] & kmask[None, :], 0.0)


@triton.jit
def _round_rows(w_ptr, s_ptr, lo_ptr, hi_ptr, f_ptr, g_ptr, code_ptr, e_ptr, rows, rmask, kk, kmask, stride_fr,
                stride_fk, stride_gr, stride_gk, za, FEED: tl.constexpr):  # fmt: skip
    """Round a chunk's rows on the grid at ``w`` (nearest rounding) or, with ``FEED``, at the nearest plane's fed
    value ``w + F za``; store the centred codes and ``e = w - s * code``; return the chunk's ``G^T e`` and
    ``|e|^2``."""
    w = tl.load(w_ptr + rows, rmask, 0.0)
    s = tl.load(s_ptr + rows, rmask, 1.0)
    lo = tl.load(lo_ptr + rows, rmask, 0.0)
    hi = tl.load(hi_ptr + rows, rmask, 0.0)
    target = w
    if FEED:
        target = w + tl.sum(_tile(f_ptr, rows, rmask, kk, kmask, stride_fr, stride_fk) * za[None, :], axis=1)
    code = tl.minimum(tl.maximum(_rint(tl.math.div_rn(target, s)), lo), hi)
    e = tl.where(rmask, w - s * code, 0.0)
    tl.store(code_ptr + rows, code, rmask)
    tl.store(e_ptr + rows, e, rmask)
    G = _tile(g_ptr, rows, rmask, kk, kmask, stride_gr, stride_gk)
    return tl.sum(G * e[:, None], axis=0), tl.sum(e * e)


@triton.jit
def _moves(code_ptr, e_ptr, s_ptr, lo_ptr, hi_ptr, nc_ptr, g_ptr, rows, rmask, kk, kmask, stride_gr, stride_gk, z):
    """A chunk's rows as a descent pass sees them: centred code, ``e``, scale, ``c = e + g_r . z`` (the objective's
    half-gradient), the best move ``d`` (+-1, or 0 at the grid's edge), its gain ``d (2 s c - s^2 M_rr d)``, and
    the chunk's ``G`` rows."""
    code = tl.load(code_ptr + rows, rmask, 0.0)
    e = tl.load(e_ptr + rows, rmask, 0.0)
    s = tl.load(s_ptr + rows, rmask, 1.0)
    lo = tl.load(lo_ptr + rows, rmask, 0.0)
    hi = tl.load(hi_ptr + rows, rmask, 0.0)
    nc = tl.load(nc_ptr + rows, rmask, 0.0)
    G = _tile(g_ptr, rows, rmask, kk, kmask, stride_gr, stride_gk)
    c = e + tl.sum(G * z[None, :], axis=1)
    up = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    d = tl.minimum(tl.maximum(up + code, lo), hi) - code
    gain = (2 * s * c + nc * d) * d
    return code, e, s, c, d, gain, G


@triton.jit
def _round_column_kernel(
    w_ptr, s_ptr, lo_ptr, hi_ptr, nc_ptr, g_ptr, f_ptr,
    code_ptr, e_ptr, cp_ptr, ep_ptr,
    R, K, PB, tau, tiny,
    stride_wn, stride_sn, stride_gn, stride_gr, stride_gk, stride_fn, stride_fr, stride_fk,
    PASSES: tl.constexpr, HAS_PLANE: tl.constexpr, BR: tl.constexpr, KP: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    w_ptr += n * stride_wn
    s_ptr += n * stride_sn  # scale, lo, hi and the move cost share the grid's layout
    lo_ptr += n * stride_sn
    hi_ptr += n * stride_sn
    nc_ptr += n * stride_sn
    g_ptr += n * stride_gn
    f_ptr += n * stride_fn
    code_ptr += n * R  # scratch and output: contiguous (N, R)
    e_ptr += n * R
    cp_ptr += n * R
    ep_ptr += n * R
    kk = tl.arange(0, KP)
    kmask = kk < K
    br = tl.arange(0, BR)

    # 1. Nearest rounding (centred codes), e = w - s * code, z = G^T e.
    z = tl.zeros((KP,), tl.float32)
    f_near = 0.0
    for r0 in range(0, R, BR):
        rows = r0 + br
        dz, ee = _round_rows(w_ptr, s_ptr, lo_ptr, hi_ptr, f_ptr, g_ptr, code_ptr, e_ptr, rows, rows < R, kk, kmask,
                             stride_fr, stride_fk, stride_gr, stride_gk, z, False)  # fmt: skip
        z += dz
        f_near += ee
    f_near += tl.sum(z * z)
    tl.debug_barrier()  # the passes read back what this sweep stored

    # 2. The blocked nearest plane: block [a, a + PB) rounds w + F z_a with z_a the z of the blocks before it.
    if HAS_PLANE:
        zp = tl.zeros((KP,), tl.float32)
        f_plane = 0.0
        for a in range(0, R, PB):
            za = zp
            for r0 in range(a, a + PB, BR):
                rows = r0 + br
                rmask = (rows < R) & (rows < a + PB)
                dz, ee = _round_rows(w_ptr, s_ptr, lo_ptr, hi_ptr, f_ptr, g_ptr, cp_ptr, ep_ptr, rows, rmask, kk,
                                     kmask, stride_fr, stride_fk, stride_gr, stride_gk, za, True)  # fmt: skip
                zp += dz
                f_plane += ee
        f_plane += tl.sum(zp * zp)
        tl.debug_barrier()
        if f_plane < f_near:  # never worse than nearest rounding: keep the plane's start
            for r0 in range(0, R, BR):
                rows = r0 + br
                rmask = rows < R
                tl.store(code_ptr + rows, tl.load(cp_ptr + rows, rmask, 0.0), rmask)
                tl.store(e_ptr + rows, tl.load(ep_ptr + rows, rmask, 0.0), rmask)
            z = zp
        tl.debug_barrier()

    # 3. Coordinate-descent passes (metric_rounding.round_column's loop, the same moves).
    for _pass in tl.static_range(PASSES):
        best = -float("inf")
        at = 0
        for r0 in range(0, R, BR):
            rows = r0 + br
            rmask = rows < R
            _ca, _ea, _sa, _c, _da, gain, _ga = _moves(
                code_ptr, e_ptr, s_ptr, lo_ptr, hi_ptr, nc_ptr, g_ptr, rows, rmask, kk, kmask,
                stride_gr, stride_gk, z,
            )  # fmt: skip
            gain = tl.where(rmask, gain, -float("inf"))
            m = tl.max(gain, axis=0)
            i = tl.argmax(gain, axis=0)
            at = tl.where(m > best, r0 + i, at)  # strictly greater: the first row of the largest gain
            best = tl.maximum(best, m)
        if best > 0:
            threshold = tl.maximum(tau * best, tiny)
            dz = tl.zeros((KP,), tl.float32)
            change = 0.0
            for r0 in range(0, R, BR):  # the joint move and its exact change of the objective
                rows = r0 + br
                rmask = rows < R
                _cb, _eb, s, c, d, gain, G = _moves(
                    code_ptr, e_ptr, s_ptr, lo_ptr, hi_ptr, nc_ptr, g_ptr, rows, rmask, kk, kmask,
                    stride_gr, stride_gk, z,
                )  # fmt: skip
                de = tl.where(rmask & (gain > threshold), d * s, 0.0)
                dz += tl.sum(G * de[:, None], axis=0)
                change += tl.sum(de * (de - 2 * c))
            change += tl.sum(dz * dz)
            tl.debug_barrier()
            if change < 0:
                for r0 in range(0, R, BR):
                    rows = r0 + br
                    rmask = rows < R
                    code, e, s, _cc, d, gain, _gc = _moves(
                        code_ptr, e_ptr, s_ptr, lo_ptr, hi_ptr, nc_ptr, g_ptr, rows, rmask, kk, kmask,
                        stride_gr, stride_gk, z,
                    )  # fmt: skip
                    step = tl.where(gain > threshold, d, 0.0)
                    tl.store(code_ptr + rows, code + step, rmask)
                    tl.store(e_ptr + rows, e - step * s, rmask)
                z -= dz
            else:  # the best move alone: row `at`
                rows = at + tl.arange(0, 2)
                rmask = rows == at
                code, e, s, _cd, d, _gd, G = _moves(
                    code_ptr, e_ptr, s_ptr, lo_ptr, hi_ptr, nc_ptr, g_ptr, rows, rmask, kk, kmask,
                    stride_gr, stride_gk, z,
                )  # fmt: skip
                d = tl.where(rmask, d, 0.0)
                tl.store(code_ptr + rows, code + d, rmask)
                tl.store(e_ptr + rows, e - d * s, rmask)
                z -= tl.sum(G * (d * s)[:, None], axis=0)
            tl.debug_barrier()


def round_column_fused(
    w: torch.Tensor,
    scale: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    neg_cost: torch.Tensor,
    G: torch.Tensor,
    feed: torch.Tensor | None,
    plane_rows: int,
    passes: int,
    tau: float,
) -> torch.Tensor:
    """Centred codes ``(N, R)`` (``code - zero``) of ``round_column`` for a column ``w`` ``(N, R)``: grid tensors
    ``(N, R)`` sharing one layout, ``G`` ``(N or 1 expanded, R, k)``, ``feed`` the plan's feedback rows stacked
    ``(N or 1 expanded, R, k)`` with blocks of ``plane_rows`` (``None``: start from nearest rounding only)."""
    N, R = w.shape
    k = G.shape[-1]
    if w.stride(-1) != 1 or scale.stride(-1) != 1 or G.dtype != torch.float32 or w.dtype != torch.float32:
        raise ValueError("round_column_fused takes float32 columns with contiguous rows")
    for t in (lo, hi, neg_cost):
        if t.stride() != scale.stride():
            raise ValueError("round_column_fused: the grid tensors must share scale's layout")
    code = torch.empty(N, R, device=w.device, dtype=torch.float32)
    e = torch.empty_like(code)
    cp = torch.empty_like(code) if feed is not None else code
    ep = torch.empty_like(code) if feed is not None else e
    f = feed if feed is not None else G
    kp = max(16, triton.next_power_of_2(k))
    br = max(16, min(128, 8192 // kp))  # a chunk of G is br x kp floats: 32 KB
    _round_column_kernel[(N,)](
        w, scale, lo, hi, neg_cost, G, f, code, e, cp, ep,
        R, k, max(1, plane_rows), float(tau), float(torch.finfo(torch.float32).tiny),
        w.stride(0), scale.stride(0), G.stride(0), G.stride(1), G.stride(2), f.stride(0), f.stride(1), f.stride(2),
        PASSES=passes, HAS_PLANE=feed is not None, BR=br, KP=kp,
        enable_fp_fusion=False,  # torch rounds w - s * code twice (no fused multiply-add): so do we
    )  # fmt: skip
    return code
