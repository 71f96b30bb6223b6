"""The VSRAQ terms (DESIGN 3.3-3.5): pure functions on tensors; the pipeline only calls them.

Notation: for one MoE layer, ``z`` are the full-precision router logits of the calibration tokens, ``s``
the FP selection scores (logits, or DeepSeek's biased sigmoid), ``m = s_(k) - s_(k+1)`` the FP boundary
margin, ``tau`` its median, and ``phi(m) = exp(-m / tau)`` the fragility of a token (1 at a tie, small
for a confident decision).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import ROUTER_SOLVES
from .routing import Routing, boundary_margin, topk_set_agreement


# ---------------------------------------------------------------------------------------------- fragility
def margin_scale(margins: torch.Tensor) -> float:
    """``tau``: the median finite margin (DESIGN 3.3), floored to stay positive."""
    finite = margins[torch.isfinite(margins)]
    return max(float(finite.median()) if finite.numel() else 1.0, 1e-6)


def fragility(margins: torch.Tensor, tau: float) -> torch.Tensor:
    """``phi(m) = exp(-m / tau)``; infinite margins (no boundary) give 0."""
    return torch.exp(-margins.clamp(min=0) / tau)


def token_weights(margins: torch.Tensor, lam: float, tau: float) -> torch.Tensor:
    """``w_t = 1 + lambda * phi(m_t)`` (DESIGN 3.3): more weight where the FP decision is close."""
    return 1.0 + lam * fragility(margins, tau)


def boundary_participants(selection: torch.Tensor, k: int, band: float, tau: float) -> torch.Tensor:
    """``[i in B_t]`` (DESIGN 3.4): expert i is the k-th choice of token t, or a non-selected expert whose
    selection score is within ``band * tau`` of the k-th: the rows whose errors flip the decision."""
    top = selection.topk(k, dim=-1)
    kth = top.values[..., -1:]
    is_kth = torch.zeros_like(selection, dtype=torch.bool).scatter_(-1, top.indices[..., -1:], True)
    chosen = torch.zeros_like(selection, dtype=torch.bool).scatter_(-1, top.indices, True)
    near = (~chosen) & (kth - selection <= band * tau) & torch.isfinite(selection)
    return is_kth | near


# ---------------------------------------------------------------------------------------------- token layout
@dataclass
class TokenSplit:
    """Where this process's calibration tokens sit (exact sums, ``distributed.py``): ``local``, their slice of
    the global token order (per-token FP quantities are computed globally, then sliced); ``bounds``, every
    calibration batch's token range in local indices (sums are float64 sums of per-batch float32 terms); and
    ``reduce``, the in-place sum over the processes (identity for one process)."""

    local: slice
    bounds: list[tuple[int, int]]
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)

    def subset(self, positions: torch.Tensor) -> TokenSplit:
        """The split of a subset of the local tokens (sorted local indices), batch by batch."""
        starts = [int(torch.searchsorted(positions, t0)) for t0, _ in self.bounds]
        ends = [int(torch.searchsorted(positions, t1)) for _, t1 in self.bounds]
        return TokenSplit(slice(0, positions.numel()), list(zip(starts, ends, strict=True)), self.reduce)


# ---------------------------------------------------------------------------------------------- router
def router_normal_equations(
    X: torch.Tensor, Z: torch.Tensor, W: torch.Tensor, split: TokenSplit | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row weighted normal equations ``A_i = X^T W_i X``, ``b_i = X^T W_i z_i`` and ``sum_t w_ti``.

    Additive over tokens, so a reweighting round only adds the changed tokens' terms. The row weights are
    split into a per-token base shared by every row (one ``X^T diag(w) X``) plus a sparse per-row excess
    (the boundary participants), so the cost is one full Gram matrix plus small ones, in float32; the
    solve is done in float64.
    """
    if split is not None:
        return _sharded_normal_equations(X, Z, W, split)
    Xf = X.float()
    G, b, wsum, extra = _batch_terms(Xf, W, Z)
    A = G.expand(W.shape[1], -1, -1).clone()
    for i in range(W.shape[1]):  # one small Gram matrix per row, over its extra-weighted tokens only
        rows = extra[:, i].nonzero().flatten()
        if rows.numel():
            Xi = Xf[rows]
            A[i] += (Xi * extra[rows, i, None]).T @ Xi
    return A.double(), b.double(), wsum.double()


def _batch_terms(Xf: torch.Tensor, W: torch.Tensor, Z: torch.Tensor):
    """One batch's float32 terms of the router's normal equations: the shared Gram ``X^T diag(base) X`` (``base`` =
    each token's smallest row weight), ``b = (W * Z)^T X``, ``sum_t w_t`` and the per-row excess ``W - base``."""
    Wf, Zf = W.float(), Z.float()
    base = Wf.min(dim=1).values  # (T,)
    extra = Wf - base[:, None]  # (T, E), zero except where a row weighs a token more
    return (Xf * base[:, None]).T @ Xf, (Wf * Zf).T @ Xf, Wf.sum(0), extra


def _sharded_normal_equations(X, Z, W, split: TokenSplit):
    """``router_normal_equations`` as float64 sums of per-batch float32 terms, summed over the processes: the
    same sums whatever the split of the batches (exact sums, ``TokenSplit``)."""
    E, d = W.shape[1], X.shape[1]
    A = torch.zeros(E, d, d, dtype=torch.float64, device=X.device)
    G = torch.zeros(d, d, dtype=torch.float64, device=X.device)
    b = torch.zeros(E, d, dtype=torch.float64, device=X.device)
    wsum = torch.zeros(E, dtype=torch.float64, device=X.device)
    for t0, t1 in split.bounds:
        if t1 <= t0:
            continue
        Xf = X[t0:t1].float()
        g, bb, ws, extra = _batch_terms(Xf, W[t0:t1], Z[t0:t1])
        G += g
        for i in range(E):
            rows = extra[:, i].nonzero().flatten()
            if rows.numel():
                Xi = Xf[rows]
                A[i] += (Xi * extra[rows, i, None]).T @ Xi
        b += bb
        wsum += ws
    for t in (G, A, b, wsum):
        split.reduce(t)
    A += G
    return A, b, wsum


def solve_router(A: torch.Tensor, b: torch.Tensor, wsum: torch.Tensor, R0: torch.Tensor, ridge: float) -> torch.Tensor:
    """``R_i = (A_i / s_i + rho_i I)^-1 (b_i / s_i + rho_i r0_i)``, ``rho_i = ridge * mean diag(A_i / s_i)``."""
    s = wsum.clamp(min=1e-12)[:, None]
    A = A / s[:, :, None]
    b = b / s
    rho = ridge * torch.diagonal(A, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    # The system is symmetric positive definite (a Gram matrix plus a ridge): Cholesky, not LU. (MKL's
    # batched LU pivoting errors out under 2 threads with torch 2.13's CPU build.)
    L = torch.linalg.cholesky(A + rho[:, None, None] * eye)
    R = torch.cholesky_solve((b + rho[:, None] * R0.double())[..., None].contiguous(), L)[..., 0]
    return R.to(R0.dtype)


# ---------------------------------------------------------------------------------------------- router, matrix-free
DENSE_ROUTER_BYTES = 256 * 2**20  # router_solve="auto": the dense (E, d, d) float64 solve up to this size
CG_TOL = 1e-10  # relative residual of every row's system, in float64
CG_MAX_ITER = 200  # then the rows not yet converged are solved densely, one (d, d) matrix at a time
SHIFT_RATIO = 4.0  # rows whose ridge shifts lie within this ratio share one preconditioner factor
# excess_times by batch (a few launches each) or by row (a few each); None: by batch on a GPU. On the CPU the
# row loop is cheaper: the batch form multiplies a (rows, entries) matrix that is mostly zeros.
EXCESS_BY_BATCH: bool | None = None
EXCESS_CHUNK = 2**25  # float64 elements of the entries' inputs per product in the batch form (256 MiB)
EXCESS_ROWS = 32  # router rows per product in the batch form: up to (1 + this) / 2 times the loop's multiply-adds


def _excess_groups(segments: list[tuple[int, int, int]], d: int) -> list[tuple[int, int, int, int]]:
    """``(row0, row1, entry0, entry1)``: the batch's ``(row, start, end)`` segments (sorted by row) in groups of
    consecutive rows spanning at most ``EXCESS_ROWS`` rows and ``EXCESS_CHUNK`` input elements; a segment larger
    than that alone is cut into entry ranges of its row. Host arithmetic on the segment list: no device read."""
    step = max(1, EXCESS_CHUNK // max(d, 1))
    groups, cur = [], None
    for i, e0, e1 in segments:
        if e1 - e0 > step:
            if cur is not None:
                groups.append(cur)
                cur = None
            groups += [(i, i + 1, s0, min(e1, s0 + step)) for s0 in range(e0, e1, step)]
            continue
        if cur is not None and (i + 1 - cur[0] > EXCESS_ROWS or e1 - cur[2] > step):
            groups.append(cur)
            cur = None
        cur = (i, i + 1, e0, e1) if cur is None else (cur[0], i + 1, cur[2], e1)
    if cur is not None:
        groups.append(cur)
    return groups


def dense_router_solve(solve: str, experts: int, dim: int) -> bool:
    """Whether ``router_solve`` (``auto``/``dense``/``cg``) means the dense (E, d, d) solve for this router."""
    if solve not in ROUTER_SOLVES:
        raise ValueError(f"router_solve={solve!r} is unknown; use one of {ROUTER_SOLVES}.")
    return solve == "dense" or (solve == "auto" and experts * dim * dim * 8 <= DENSE_ROUTER_BYTES)


@dataclass
class _Batch:
    """One calibration batch's share of a block of per-row excess terms: entries sorted by (row, token);
    ``segments`` holds ``(row, start, end)`` entry ranges."""

    tokens: torch.Tensor  # (n,) indices into X
    weights: torch.Tensor  # (n,) float32
    segments: list[tuple[int, int, int]]
    rows: torch.Tensor  # (n,) int32: each entry's row (the segments, per entry)


def _add_split(acc: torch.Tensor, P: torch.Tensor) -> None:
    """Add a float64 term as two float32 parts (``acc[0]``: its rounding, ``acc[1]``: the rest), each summed in
    float64: float64 sums of float32 terms, so the total does not depend on how the batches are split."""
    hi = P.float()
    acc[0] += hi
    acc[1] += (P - hi.double()).float()


class RouterSystem:
    """The router's normal equations without the ``(E, d, d)`` tensor: ``A_i = G + X_{S_i}^T diag(e_i) X_{S_i}``.

    ``G = X^T diag(base) X`` is shared by every row (``base`` = a token's smallest row weight); the excess
    ``e_ti = w_ti - base_t`` is sparse (boundary participants) and kept as token/weight lists per row and batch,
    never as matrices. Sums follow ``router_normal_equations`` (float64 sums of per-batch float32 terms,
    reduced over the processes); ``solve`` runs preconditioned conjugate gradients over all rows at once.
    Memory: O(d^2 + E d + nnz).
    """

    def __init__(self, X: torch.Tensor, experts: int, split: TokenSplit | None = None) -> None:
        T, d = X.shape
        self.X, self.E, self.d = X, experts, d
        self.split = split if split is not None else TokenSplit(slice(0, T), [(0, T)])
        f64 = {"dtype": torch.float64, "device": X.device}
        self.G = torch.zeros(d, d, **f64)
        self.b = torch.zeros(experts, d, **f64)
        self.wsum = torch.zeros(experts, **f64)
        self.excess_trace = torch.zeros(experts, **f64)  # tr(X_S^T diag(e_i) X_S), for the ridge's scale
        self.batches: list[_Batch] = []
        self.iterations: list[int] = []  # CG iterations of each solve
        self.dense_rows = 0  # rows that did not converge within CG_MAX_ITER and were solved densely
        self._added = False

    def add(self, Z: torch.Tensor, W: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Add the terms of the tokens ``X[positions]`` (all when None, else sorted local indices) with FP logits
        ``Z`` and row weights ``W`` (both of those tokens): a reweighting round adds the flipped tokens again."""
        split = self.split if positions is None else self.split.subset(positions)
        Xs = self.X if positions is None else self.X[positions]
        index = (lambda t: t) if positions is None else (lambda t: positions[t])
        first = not self._added  # the first terms sum straight into G: one (d, d) matrix less at DeepSeek widths
        G = self.G if first else torch.zeros_like(self.G)
        b, wsum, trace = (torch.zeros_like(t) for t in (self.b, self.wsum, self.excess_trace))
        for t0, t1 in split.bounds:
            if t1 <= t0:
                continue
            Xf = Xs[t0:t1].float()
            g, bb, ws, extra = _batch_terms(Xf, W[t0:t1], Z[t0:t1])
            G += g
            b += bb
            wsum += ws
            rows, toks = extra.T.nonzero(as_tuple=True)  # sorted by (row, token)
            weights = extra[toks, rows]
            trace += torch.zeros(self.E, device=Xf.device).index_add_(0, rows, weights * Xf.square().sum(1)[toks])
            counts = torch.bincount(rows, minlength=self.E).tolist()
            ends = torch.tensor(counts).cumsum(0).tolist()
            segments = [(i, e - n, e) for i, (n, e) in enumerate(zip(counts, ends, strict=True)) if n]
            if segments:
                self.batches.append(_Batch(index(toks + t0), weights, segments, rows.to(torch.int32)))
        for t in (G, b, wsum, trace):
            self.split.reduce(t)
        # float32 Gram products are not exactly symmetric; keep the lower triangle (what the dense path's
        # Cholesky reads), mirrored, so that CG's operator is symmetric.
        _mirror_lower(G)
        if not first:
            self.G += G
        self._added = True
        self.b += b
        self.wsum += wsum
        self.excess_trace += trace

    def excess_times(self, V: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``X_{S_i}^T diag(e_i) X_{S_i} v_i`` for the given rows (``V`` ``(n, d)`` float64), over every batch.

        Each batch's term is computed in float64 and split into two float32 parts, each summed in float64 and
        reduced: float64 sums of float32 terms, so the result does not depend on how batches are split.
        On a GPU (``EXCESS_BY_BATCH``) each batch is a few launches (``_batch_excess``), not a few per row."""
        by_batch = V.is_cuda if EXCESS_BY_BATCH is None else EXCESS_BY_BATCH
        acc = torch.zeros(2, *V.shape, dtype=torch.float64, device=V.device)
        if by_batch:
            slot_of = torch.full((self.E,), -1, dtype=torch.long, device=V.device)
            slot_of[rows] = torch.arange(rows.numel(), device=V.device)
            for batch in self.batches:
                _add_split(acc, self._batch_excess(batch, V, slot_of, rows))
        else:
            slot = [-1] * self.E
            for j, i in enumerate(rows.tolist()):
                slot[i] = j
            for batch in self.batches:
                P = None
                for i, e0, e1 in batch.segments:
                    j = slot[i]
                    if j < 0:
                        continue
                    if P is None:
                        P = torch.zeros_like(V)
                    Xi = self.X[batch.tokens[e0:e1]].double()
                    P[j] = Xi.T @ (batch.weights[e0:e1].double() * (Xi @ V[j]))
                if P is not None:
                    _add_split(acc, P)
        self.split.reduce(acc)
        return acc[0] + acc[1]

    def _batch_excess(self, batch: _Batch, V: torch.Tensor, slot_of: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """One batch's ``X_S^T diag(e_i) X_S v_i`` for the asked ``rows`` at once, without a host read. Entries are
        sorted by row, so a group of up to ``EXCESS_ROWS`` consecutive rows is a contiguous entry range: each entry's
        coefficient ``e_ti x_t . v_i`` (zero for rows not asked), then the group's row sums as one product of a
        ``(group rows, entries)`` coefficient matrix with the entries' inputs (up to ``(1 + EXCESS_ROWS) / 2`` times the
        row loop's multiply-adds, on a GPU's float64 units), at most ``EXCESS_CHUNK`` input elements at a time. The same
        sums as the row loop in another order (float64: they agree to ~1e-15 relative)."""
        P = torch.zeros(self.E, self.d, dtype=torch.float64, device=V.device)  # by router row, then by slot
        for r0, r1, e0, e1 in _excess_groups(batch.segments, self.d):
            Xi = self.X[batch.tokens[e0:e1]].double()
            j = slot_of[batch.rows[e0:e1]]
            dots = (Xi * V[j.clamp(min=0)]).sum(1)
            coef = torch.where(j >= 0, batch.weights[e0:e1].double() * dots, torch.zeros_like(dots))
            C = torch.zeros(r1 - r0, e1 - e0, dtype=torch.float64, device=V.device)
            C[batch.rows[e0:e1] - r0, torch.arange(e1 - e0, device=V.device)] = coef
            P[r0:r1] += C @ Xi
        return P[rows]

    def row_matrix(self, i: int) -> torch.Tensor:
        """``A_i`` ``(d, d)`` float64 for one row (the fallback): the system CG solves, summed as ``excess_times``."""
        acc = torch.zeros(2, self.d, self.d, dtype=torch.float64, device=self.G.device)
        for batch in self.batches:
            for j, e0, e1 in batch.segments:
                if j == i:
                    Xi = self.X[batch.tokens[e0:e1]].double()
                    _add_split(acc, (Xi * batch.weights[e0:e1, None].double()).T @ Xi)
        self.split.reduce(acc)
        return acc[0] + acc[1] + self.G

    def solve(self, R0: torch.Tensor, ridge: float, start: torch.Tensor | None = None) -> torch.Tensor:
        """``solve_router``'s ridge solve, matrix-free: ``(A_i + c_i I) r_i = b_i + c_i r0_i`` with
        ``c_i = s_i rho_i`` (the same system times ``s_i``), by preconditioned CG from ``start`` (default ``R0``)."""
        s = self.wsum.clamp(min=1e-12)
        trace = torch.diagonal(self.G).sum() + self.excess_trace
        rho = ridge * (trace / s / self.d).clamp(min=1e-12)
        c = s * rho
        rhs = self.b + c[:, None] * R0.double()
        R = (R0 if start is None else start).double().clone()
        iterations = 0
        for rows in _shift_groups(c, SHIFT_RATIO):
            iterations = max(iterations, self._pcg(R, rhs, c, rows))
        self.iterations.append(iterations)
        return R.to(R0.dtype)

    def _pcg(self, R: torch.Tensor, rhs: torch.Tensor, c: torch.Tensor, rows: torch.Tensor) -> int:
        """Batched preconditioned CG on ``rows`` (in place in ``R``); returns the iterations run.

        Preconditioner ``(G + cbar I)^-1`` with one Cholesky factor, ``cbar`` the geometric middle of the rows'
        shifts: ``A_i + c_i I = (G + cbar I) + (c_i - cbar) I + excess_i``, and with ``e_ti <= lambda w_t`` the
        excess adds eigenvalues below ``lambda`` to the preconditioned spectrum (a hat-matrix bound), the shift
        mismatch a factor below ``sqrt(SHIFT_RATIO)``: a condition number of a few, so CG takes tens of steps."""
        cr = c[rows]
        shift = float((cr.min() * cr.max()).sqrt())
        if not (bool(torch.isfinite(self.G).all()) and math.isfinite(shift)):
            from .gptq import HessianError

            raise HessianError(
                "the router re-fit's Gram matrix holds NaN/Inf: the quantized stream reaching this router diverged "
                "(check the model's weights and the calibration data, or use router_mode='keep')."
            )
        jitter = 1e-12 * float(torch.diagonal(self.G).mean().clamp(min=1e-30))
        for _ in range(30):  # shift ~ 0 on a singular G (ridge 0): a tiny jitter keeps the preconditioner defined
            M = self.G.clone()
            M.diagonal().add_(shift)
            L, info = torch.linalg.cholesky_ex(M)
            del M
            if not int(info):
                break
            shift, jitter = shift + jitter, jitter * 100
        else:
            from .gptq import HessianError

            raise HessianError(
                "the router re-fit's Gram matrix is not positive definite even with a large shift; use "
                "router_solve='dense' or router_mode='keep' for this model."
            )

        def op(V: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return V @ self.G + self.excess_times(V, rows[idx]) + cr[idx, None] * V

        def precondition(Res: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(Res.T.contiguous(), L).T

        everyone = torch.arange(rows.numel(), device=R.device)
        V, B = R[rows], rhs[rows]
        Res = B - op(V, everyone)
        Zp = precondition(Res)
        P, rz = Zp.clone(), (Res * Zp).sum(1)
        target = CG_TOL * B.norm(dim=1)
        active = Res.norm(dim=1) > target
        it = 0
        while bool(active.any()) and it < CG_MAX_ITER:
            a = active.nonzero().flatten()
            Pa = P[a]
            Q = op(Pa, a)
            alpha = rz[a] / (Pa * Q).sum(1)
            V[a] += alpha[:, None] * Pa
            Ra = Res[a] - alpha[:, None] * Q
            Res[a] = Ra
            Za = precondition(Ra)
            rz_new = (Ra * Za).sum(1)
            P[a] = Za + (rz_new / rz[a])[:, None] * Pa
            rz[a] = rz_new
            active[a] = Ra.norm(dim=1) > target[a]
            it += 1
        R[rows] = V
        for j in active.nonzero().flatten().tolist():  # not converged: the row's own (d, d) system, densely
            i = int(rows[j])
            A = self.row_matrix(i)
            A.diagonal().add_(float(c[i]))
            R[i] = torch.cholesky_solve(rhs[i, :, None], torch.linalg.cholesky(A))[:, 0]
            self.dense_rows += 1
        return it


def _mirror_lower(G: torch.Tensor, block: int = 1024) -> None:
    """``G <- tril(G) + tril(G, -1)^T`` in place, block by block (no second (d, d) matrix)."""
    n = G.shape[0]
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        D = G[j0:j1, j0:j1]
        D.copy_(D.tril() + D.tril(-1).T)
        G[j0:j1, j1:] = G[j1:, j0:j1].T


def _shift_groups(c: torch.Tensor, ratio: float) -> list[torch.Tensor]:
    """Rows grouped by their shift ``c_i``, each group within ``ratio`` (one preconditioner factor per group)."""
    order = c.argsort()
    cs = c[order].tolist()
    groups, start = [], 0
    for j in range(1, len(cs) + 1):
        if j == len(cs) or cs[j] > ratio * cs[start]:
            groups.append(order[start:j])
            start = j
    return groups


def refit_router(
    X: torch.Tensor, Z: torch.Tensor, R0: torch.Tensor, row_weights: torch.Tensor, ridge: float, solve: str = "auto"
) -> torch.Tensor:
    """Closed-form value alignment of a 16-bit router (DESIGN 3.3/3.4), one ridge solve per row:

    ``R_i = argmin sum_t w_ti (r_i . x_t - z_ti)^2 / sum_t w_ti + rho_i ||r_i - r0_i||^2``,
    ``rho_i = ridge * mean diag(X^T W_i X / sum_t w_ti)``.

    ``X``: quantized-stream router inputs ``(T, d)``; ``Z``: FP logits ``(T, E)``; ``row_weights`` ``(T, E)``.
    The ridge pulls each row toward the original where the data are thin, so the re-fit cannot drift.
    ``solve``: dense normal equations or matrix-free CG (``RouterSystem``), see ``dense_router_solve``.
    """
    if dense_router_solve(solve, *R0.shape):
        return solve_router(*router_normal_equations(X, Z, row_weights), R0, ridge)
    system = RouterSystem(X, R0.shape[0])
    system.add(Z, row_weights)
    return system.solve(R0, ridge)


def router_row_weights(
    selection: torch.Tensor, k: int, lambda_value: float, lambda_structure: float, margin_band: float
) -> torch.Tensor:
    """``w_ti = (1 + lambda_value * phi(m_t)) * (1 + lambda_structure * [i in B_t])`` (DESIGN 3.3, 3.4), ``(T, E)``."""
    margins = boundary_margin(selection, k)
    tau = margin_scale(margins)
    w_t = token_weights(margins, lambda_value, tau)
    return w_t[:, None] * (1.0 + lambda_structure * boundary_participants(selection, k, margin_band, tau).float())


def router_row_hessians(
    X: torch.Tensor,
    selection: torch.Tensor,
    k: int,
    lambda_value: float,
    lambda_structure: float,
    margin_band: float,
    split: TokenSplit | None = None,
) -> torch.Tensor:
    """Per-row weighted Hessians ``H_i = X^T W_i X / sum_t w_ti`` ``(E, d, d)`` for GPTQ on the router
    (``router_mode="quantize"``, DESIGN 3.3): the rows of the experts at the boundary weigh the fragile tokens.
    With ``split``, ``selection`` covers every token and ``X`` this process's (exact sums)."""
    rows = router_row_weights(selection, k, lambda_value, lambda_structure, margin_band)
    if split is not None:
        rows = rows[split.local]
    A, _, wsum = router_normal_equations(X, torch.zeros_like(rows), rows, split)
    return (A / wsum.clamp(min=1e-12)[:, None, None]).float()


@dataclass
class RouterFit:
    weight: torch.Tensor
    rounds: int
    agreement: list[float]  # top-k set agreement with FP on the calibration tokens, before and after each round
    solve: str = "dense"  # dense | cg
    cg_iterations: list[int] = field(default_factory=list)  # per solve (cg)
    dense_rows: int = 0  # cg: rows that did not converge and were solved densely


def align_router(
    X: torch.Tensor,
    fp_logits: torch.Tensor,
    R0: torch.Tensor,
    route_fn,
    k: int,
    lambda_value: float,
    lambda_structure: float,
    margin_band: float,
    rounds: int,
    ridge: float = 0.1,
    split: TokenSplit | None = None,
    solve: str = "auto",
) -> RouterFit:
    """Value + structure alignment of the router on the quantized stream (DESIGN 3.3, 3.4).

    Token weights ``1 + lambda_value * phi(m)``; rows weighted ``1 + lambda_structure`` where the expert is a
    boundary participant; then ``rounds`` of reweighting (the quadratic stand-in for a hinge): tokens whose
    top-k set still differs from FP get their weight doubled, and the solve is repeated. A round that does
    not raise agreement is discarded. With ``split`` (exact sums), ``fp_logits`` covers every calibration token
    and ``X`` this process's; sums and agreement counts are reduced over the processes. ``solve``: the dense
    ``(E, d, d)`` normal equations or the matrix-free ``RouterSystem`` (``dense_router_solve``).
    """
    fp: Routing = route_fn(fp_logits)
    E = fp_logits.shape[-1]
    rows = router_row_weights(fp.selection, k, lambda_value, lambda_structure, margin_band)
    fp_sets = fp.indices
    if split is not None:  # this process's tokens of the global FP decisions
        rows, fp_sets, fp_logits = rows[split.local], fp_sets[split.local], fp_logits[split.local]

    def agreement(R: torch.Tensor) -> tuple[float, torch.Tensor]:
        q = route_fn(X.float() @ R.float().T)
        agree = topk_set_agreement(fp_sets, q.indices, E)
        if split is None:
            return float(agree.mean()), agree
        counts = split.reduce(torch.tensor([float(agree.sum()), float(agree.numel())], dtype=torch.float64,
                                           device=agree.device))  # fmt: skip
        return float(counts[0]) / float(counts[1]), agree

    def still_flipped(agree: torch.Tensor) -> tuple[torch.Tensor, int]:
        flipped = (agree < 1).nonzero().flatten()
        if split is None:
            return flipped, flipped.numel()
        n = split.reduce(torch.tensor([float(flipped.numel())], dtype=torch.float64, device=agree.device))
        return flipped, int(n[0])

    best_R, (best_a, agree) = R0, agreement(R0)
    history = [best_a]
    dense = dense_router_solve(solve, E, X.shape[1])
    if dense:
        A, b, wsum = router_normal_equations(X, fp_logits, rows, split)
        R = solve_router(A, b, wsum, R0, ridge)
    else:
        system = RouterSystem(X, E, split)
        system.add(fp_logits, rows)
        R = system.solve(R0, ridge)
    a, agree_new = agreement(R)
    history.append(a)
    done = 0
    if a >= best_a:
        best_R, best_a, agree = R, a, agree_new
        for _ in range(rounds):
            flipped, n_flipped = still_flipped(agree)
            if n_flipped == 0:
                break
            # Double the weight of the tokens still routed differently: add their terms once more.
            if dense:
                sub = None if split is None else split.subset(flipped)
                dA, db, dw = router_normal_equations(X[flipped], fp_logits[flipped], rows[flipped], sub)
                A, b, wsum = A + dA, b + db, wsum + dw
            else:
                system.add(fp_logits[flipped], rows[flipped], flipped)
            rows = rows.clone()
            rows[flipped] *= 2.0
            R = solve_router(A, b, wsum, R0, ridge) if dense else system.solve(R0, ridge, best_R)
            a, agree_new = agreement(R)
            history.append(a)
            if a <= best_a:
                break
            best_R, best_a, agree, done = R, a, agree_new, done + 1
    if dense:
        return RouterFit(best_R, done, history)
    return RouterFit(best_R, done, history, "cg", system.iterations, system.dense_rows)


# ---------------------------------------------------------------------------------------------- experts
def expert_pairs_fp(
    fp: Routing,
    k: int,
    next_margins: torch.Tensor | None,
    lambda_expert: float,
    near_miss_weight: float,
    margin_band: float,
    tau_next: float | None,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, expert, weight) triples for the experts' Hessians (DESIGN 3.5).

    Tokens go to the experts the FP router chose, weighted by the gate affinity times downstream fragility
    ``1 + lambda_expert * phi(m^{l+1})`` (this expert's error moves the residual the next router reads);
    near-miss experts (within ``margin_band * tau`` below the k-th choice) join with ``near_miss_weight``
    times their closeness ``phi``: after quantization they are the ones most likely to receive the token.
    """
    T = fp.indices.shape[0]
    dev = fp.indices.device
    down = (
        torch.ones(T, device=dev)
        if next_margins is None
        else token_weights(next_margins.to(dev), lambda_expert, tau_next or 1.0)
    )
    tokens = torch.arange(T, device=dev).repeat_interleave(k)
    experts = fp.indices.reshape(-1)
    weights = (fp.weights.abs() * down[:, None]).reshape(-1)
    if near_miss_weight > 0:
        sel = fp.selection
        kth = sel.topk(k, dim=-1).values[:, -1:]
        chosen = torch.zeros_like(sel, dtype=torch.bool).scatter_(-1, fp.indices, True)
        gap = kth - sel
        near = (~chosen) & (gap <= margin_band * tau) & torch.isfinite(sel)
        nt, ne = near.nonzero(as_tuple=True)
        if nt.numel():
            nw = near_miss_weight * fragility(gap[nt, ne], tau) * fp.weights.abs().mean() * down[nt]
            tokens, experts, weights = torch.cat([tokens, nt]), torch.cat([experts, ne]), torch.cat([weights, nw])
    return tokens, experts, weights


# ---------------------------------------------------------------------------------------------- residual metric
# Every boundary matrix has rank at most E - 1 (its directions are differences of router rows), far below the
# residual width, so it is kept as a factor ``F`` ``(d, r)``, ``A = F F^T``: its eigenpairs come from the ``(r, r)``
# Gram ``F^T F`` (the same nonzero eigenvalues; ``F w = sqrt(lam) v``), never from a ``(d, d)`` eigendecomposition
# (DeepSeek-V3: d = 7168, E = 256, each one 47 s on a CPU thread and several per layer).
def boundary_factor(
    router_weight: torch.Tensor, norm_weight: torch.Tensor | None, selection: torch.Tensor, k: int
) -> torch.Tensor:
    """``F`` ``(d, r)`` float64 with ``F F^T = A / ||A||`` of DESIGN 3.5b, ``r <= E``:
    ``A = sum_t phi(m_t) u_t u_t^T``, ``u_t = gamma * (r_(k) - r_(k+1))``, ``||A||`` its largest eigenvalue.

    A router reads the residual through its norm: a residual error ``e`` moves token t's boundary margin by
    about ``u_t . e / rms``. ``A`` is built through the expert pairs, ``A = D P D^T`` with ``D = gamma * R^T``
    ``(d, E)`` and ``P = sum_t phi_t (e_i - e_j)(e_i - e_j)^T`` ``(E, E)`` (PSD, factored by its own ``(E, E)``
    eigendecomposition): no per-token outer products. (The per-token ``1 / rms^2`` is left out: ``phi`` already
    ranks the tokens.)
    """
    E = selection.shape[-1]
    order = selection.topk(k + 1, dim=-1).indices
    i, j = order[:, k - 1], order[:, k]
    margins = selection.gather(1, i[:, None])[:, 0] - selection.gather(1, j[:, None])[:, 0]
    phi = fragility(margins, margin_scale(margins)).double()
    P = torch.zeros(E, E, dtype=torch.float64, device=selection.device)
    P.index_put_((i, i), phi, accumulate=True)
    P.index_put_((j, j), phi, accumulate=True)
    P.index_put_((i, j), -phi, accumulate=True)
    P.index_put_((j, i), -phi, accumulate=True)
    s, S = torch.linalg.eigh(P)
    keep = s > s[-1].clamp(min=1e-300) * 1e-12  # P's null space (at least the all-ones vector) and its rounding
    return unit_factor(_directions(router_weight, norm_weight) @ (S[:, keep] * s[keep].sqrt()))


def boundary_matrix(
    router_weight: torch.Tensor, norm_weight: torch.Tensor | None, selection: torch.Tensor, k: int
) -> torch.Tensor:
    """``A / ||A||`` of DESIGN 3.5b, ``(d, d)`` float64 (``boundary_factor`` multiplied out)."""
    F = boundary_factor(router_weight, norm_weight, selection, k)
    return F @ F.T


def _directions(router_weight: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """``D = gamma * R^T`` ``(d, E)`` float64: the residual directions a router reads (through its RMSNorm scale)."""
    D = router_weight.double().T
    return D if norm_weight is None else D * norm_weight.double()[:, None]


def uniform_boundary_factor(router_weight: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """The factor of ``A / ||A||`` with every expert pair equally weighted, ``A = D (E I - 1 1^T) D^T = E Dc Dc^T``
    (``Dc`` = ``D`` less its mean column; a router whose FP decisions are not known yet, DESIGN 3.5e (i))."""
    D = _directions(router_weight, norm_weight)
    return unit_factor(D - D.mean(1, keepdim=True))


def top_eigen(F: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``q`` eigenpairs of ``F F^T`` (``F`` ``(d, r)``) as ``(lam, U)``, ``lam`` ascending ``(q,)`` and
    ``U = V sqrt(lam)`` ``(d, q)``: ``U U^T`` is the rank-``q`` cut. From the smaller of ``F^T F`` and ``F F^T``."""
    d, r = F.shape
    if r == 0:  # A = 0 (no token near a boundary): no directions
        return F.new_zeros(0), F
    if r < d:
        lam, W = torch.linalg.eigh(F.T @ F)
        lam, W = lam[-q:].clamp(min=0), W[:, -q:]
        return lam, F @ W  # F w_i = sqrt(lam_i) v_i
    lam, V = torch.linalg.eigh(F @ F.T)
    lam, V = lam[-q:].clamp(min=0), V[:, -q:]
    return lam, V * lam.sqrt()


def unit_factor(F: torch.Tensor) -> torch.Tensor:
    """``F`` scaled so that ``F F^T`` has largest eigenvalue 1 (``||F||_2 = 1``); ``A = 0`` stays 0."""
    lam = top_eigen(F, 1)[0]
    return F / lam[-1].clamp(min=1e-300).sqrt() if lam.numel() else F


def horizon_factor(F: torch.Tensor, later: list, decay: float, rank: int) -> torch.Tensor:
    """The factor of ``A / ||A||`` of a residual write that reaches several routers (DESIGN 3.5e (i)): the next
    router's boundary matrix ``F F^T`` (normalised) plus ``decay^j`` times the uniform-pair matrix of the j-th
    router after it (``later``: ``RouterView``-like, ``.weight`` and ``.norm_weight``), cut to its top ``rank``
    directions (the fast metric solve's limit: depth never sends the solve to the exact path)."""
    parts = [F]
    for j, v in enumerate(later, start=1):
        parts.append(decay ** (j / 2) * uniform_boundary_factor(v.weight.to(F.device), _maybe(v.norm_weight, F.device)))
    return top_factor(torch.cat(parts, 1), rank)


def top_factor(F: torch.Tensor, rank: int) -> torch.Tensor:
    """The factor of ``F F^T / ||F F^T||`` cut to its top ``rank`` eigen-directions (the fast metric solve's
    limit); uncut (only normalised) when ``F F^T`` cannot exceed ``rank`` directions."""
    if min(F.shape) <= rank:
        return unit_factor(F)
    lam, U = top_eigen(F, rank)
    return U / lam[-1].clamp(min=1e-300).sqrt() if lam.numel() else U


def top_directions(A: torch.Tensor, rank: int) -> torch.Tensor:
    """``A / ||A||`` cut to its top ``rank`` eigen-directions (the fast metric solve's limit), ``A`` PSD ``(n, n)``
    (a dense matrix, e.g. a probed one; boundary matrices are cut as factors, ``top_factor``)."""
    if A.shape[-1] <= rank:
        return _unit(A)
    lam, V = torch.linalg.eigh(A)  # one (n, n) eigendecomposition: the cut and the norm from it
    lam, V = lam[-rank:].clamp(min=0), V[:, -rank:]
    return (V * (lam / lam[-1].clamp(min=1e-30))) @ V.T


def _maybe(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _unit(A: torch.Tensor) -> torch.Tensor:
    return A / torch.linalg.eigvalsh(A)[-1].clamp(min=1e-30)


def metric(A: torch.Tensor, lam: float) -> torch.Tensor:
    """``M = I + lam * A`` (``A`` normalised, PSD, ``(..., n, n)``): the metric never discounts a direction,
    only stresses some."""
    return (torch.eye(A.shape[-1], dtype=torch.float64, device=A.device) + lam * A).float()


def boundary_metric(
    router_weight: torch.Tensor, norm_weight: torch.Tensor | None, selection: torch.Tensor, k: int, lam: float
) -> torch.Tensor:
    """The output metric of a residual writer (DESIGN 3.5b): ``M = I + lam * A / ||A||``."""
    return metric(boundary_matrix(router_weight, norm_weight, selection, k), lam)


def value_path_matrix(F: torch.Tensor, o_proj: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The boundary matrix ``A = F F^T`` carried back through ``o_proj`` to ``v_proj``'s output rows (DESIGN 3.5d):
    ``B_h = sum_{q in group(h)} W_o[:, q]^T A W_o[:, q]`` for each kv head ``h`` (block diagonal: different heads
    mix different tokens), normalised. Attention mixes values linearly for fixed attention weights, so an
    error in head h's values reaches the residual through the o_proj columns of the query heads it serves."""
    d_out, d_in = o_proj.shape
    hd = d_in // num_heads
    group = num_heads // num_kv_heads
    Wo = o_proj.double().reshape(d_out, num_kv_heads, group, hd)
    G = torch.einsum("dhqi,dr->hqir", Wo, F.double())  # W_o[:, q]^T F per query head, (kv, group, hd, r)
    blocks = torch.einsum("hqir,hqjr->hij", G, G)  # (kv, hd, hd)
    top = torch.linalg.eigvalsh(blocks)[:, -1].amax().clamp(min=1e-30)  # a block diagonal's norm: its largest block's
    return torch.block_diag(*(blocks / top))


def up_path_matrices(
    F: torch.Tensor, down: torch.Tensor, gate_scale: torch.Tensor, up_scale: torch.Tensor
) -> torch.Tensor:
    """The boundary matrix ``A = F F^T`` carried back through each expert's ``down_proj`` to its gate/up rows (DESIGN
    3.5d), ``(E, 2I, 2I)``, normalised per expert: an error ``e`` in up's output reaches the residual as
    ``W_down (act(g) * e)``, one in gate's as ``W_down (act'(g) u * e)``; with ``B = W_down^T A W_down`` the
    blocks are ``diag(s) B diag(s)``, ``s`` the per-unit RMS of ``act(g)`` (up) or ``act'(g) u`` (gate) over the
    expert's tokens. Cross terms between gate and up rows are left out. Built from ``W_down^T F`` ``(E, I, r)``
    (never ``W_down^T A``: ``d`` times fewer products at DeepSeek-V3's widths), normalised from ``(r, r)`` Grams."""
    G = down.double().transpose(1, 2) @ F.double()  # (E, I, r)
    Gg, Gu = gate_scale.double()[:, :, None] * G, up_scale.double()[:, :, None] * G
    E, inter, r = G.shape

    def top(X: torch.Tensor) -> torch.Tensor:  # largest eigenvalue of X X^T per expert, from the smaller Gram
        return torch.linalg.eigvalsh(X.transpose(1, 2) @ X if r < inter else X @ X.transpose(1, 2))[:, -1]

    norm = torch.maximum(top(Gg), top(Gu)).clamp(min=1e-30)[:, None, None]  # a block diagonal's: its largest block's
    out = torch.zeros(E, 2 * inter, 2 * inter, dtype=torch.float64, device=G.device)
    out[:, :inter, :inter] = Gg @ Gg.transpose(1, 2) / norm
    out[:, inter:, inter:] = Gu @ Gu.transpose(1, 2) / norm
    return out


# ---------------------------------------------------------------------------------------------- FP targets
def writer_target(
    W: torch.Tensor,
    H: torch.Tensor,
    damp_percent: float,
    C: torch.Tensor | None = None,
    alpha: float = 0.0,
    D: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """The continuous optimum of a residual writer against its targets, one factorisation of ``H`` for both:
    the blended FP target (DESIGN 3.5c) and the stream's drift (3.5e (ii)),
    ``min ||W' X~ - (alpha W X + (1 - alpha) W X~ + beta Dr)||^2`` -> ``W' = W + (alpha W (C^T - H) + beta D) H^-1``
    with ``H = X~ X~^T``, ``C = X~ X^T``, ``D = Dr X~^T`` (weighted, count-normalised; X the FP stream's inputs,
    X~ the quantized stream's, Dr the drift FP - quantized of the residual where the writer adds its output).
    ``W`` ``(B, rows, d)``, ``H``/``C`` ``(B, d, d)``, ``D`` ``(B, rows, d)``. ``H`` is damped as GPTQ damps it;
    the products, factorisation and solve are in ``W``'s precision (at least float32, as GPTQ factorises the
    same damped ``H``); a matrix whose float32 factorisation fails is redone in float64."""
    dt = torch.promote_types(W.dtype, torch.float32)
    Hd = H.to(dt).clone()
    diag = torch.diagonal(Hd, dim1=-2, dim2=-1)
    dead = diag <= 0  # columns no token activates: no target to match
    diag.add_(damp_percent * diag.mean(-1, keepdim=True))
    diag.masked_fill_(dead, 1.0)
    L, info = torch.linalg.cholesky_ex(Hd)
    redo = (info != 0).nonzero().flatten() if dt != torch.float64 else info[:0]
    ok = (info == 0) & ~dead.all(-1)  # a matrix without data (an expert no token reached) keeps its weight
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    L[~ok] = eye  # (a failed float32 factorisation is redone in float64 below, that matrix alone)
    rows, d = W.shape[1], W.shape[2]
    # With the FP target alone, delta^T = alpha H^-1 (C - H) W^T is cheaper solved first on the d x d difference
    # (d^3 + d^2 rows multiply-adds) than multiplied out first (2 d^2 rows) wherever rows > d: an expert's down
    # (2048 x 768 at Qwen3-30B-A3B, 7168 x 2048 at DeepSeek-V3) costs 31-36 % less.
    solve_first = C is not None and alpha and not (D is not None and beta) and rows > d
    if solve_first:
        rhs = (C.to(dt) - H.to(dt)).mul_(alpha)  # (B, d, d)
    elif C is not None and alpha:  # (B, d, rows), built in place: at DeepSeek-V3's expert widths each is 15 GB
        rhs = torch.matmul(C.to(dt) - H.to(dt), W.to(dt).transpose(1, 2)).mul_(alpha)
        if D is not None and beta:
            rhs.add_(D.to(dt).transpose(1, 2), alpha=beta)
    elif D is not None and beta:
        rhs = D.to(dt).transpose(1, 2).mul(beta)
    else:
        rhs = torch.zeros(W.shape[0], d, rows, dtype=dt, device=W.device)
    delta = torch.cholesky_solve(rhs, L)
    if redo.numel():
        L64, info64 = torch.linalg.cholesky_ex(Hd[redo].double())
        good = (info64 == 0) & ~dead[redo].all(-1)
        L64[~good] = eye.double()
        delta[redo] = torch.cholesky_solve(rhs[redo].double(), L64).to(dt)
        ok[redo] = good
    if solve_first:
        delta = torch.matmul(delta, W.to(dt).transpose(1, 2))  # (B, d, rows)
    del rhs
    delta.masked_fill_(~ok[:, None, None], 0.0)
    return (W.to(dt) + delta.transpose(1, 2)).to(W.dtype)
