"""The pure VSRAQ math of vsraq.py (DESIGN 3.3-3.5f) against independent references: explicit loops over heads,
experts, rows and tokens in float64, first-order expansions computed with autograd, least squares by lstsq.

Tolerances. float64 against float64: 1e-10 relative (the computations are a few matrix products and one
symmetric eigen-solve or Cholesky; rounding leaves ~1e-14). Functions that accumulate in float32 are held to the
standard bound of a float32 sum of n products, |fl(sum) - sum| <= n u sum |terms| with u = 2^-24, evaluated
elementwise on the data with n the length of the sum plus a few roundings (never a fixed "small" number).
"""

import torch
from transformers.models.llama.modeling_llama import repeat_kv

from vsraq_plugin.vsraq import (
    boundary_matrix,
    router_normal_equations,
    router_row_hessians,
    up_path_matrices,
    value_path_matrix,
    writer_target,
)

U32 = 2.0**-24  # float32 unit roundoff
F64 = {"rtol": 1e-10, "atol": 1e-12}


def _within(got, ref, bound, what):
    err = (got.double() - ref).abs()
    assert (err <= bound).all(), f"{what}: max err {err.max():.3g}, its bound {bound.flatten()[err.argmax()]:.3g}"


# ---------------------------------------------------------------------------------------------- v_proj (3.5d)
def test_value_path_matrix_equals_the_per_head_loop_and_the_boundary_energy():
    """``B`` against (1) an explicit loop over kv heads and their query heads, ``sum_q W_o[:, q]^T A W_o[:, q]``,
    normalised; (2) the boundary energy ``sum_t r_t^T A r_t`` of the residual error ``r`` that a value error
    causes through a real attention read-out (``repeat_kv``, the head layout of the model code) and o_proj, when
    each query head reads the erroneous value at its own tokens: ``energy(e) = lambda_max * e^T B e``."""
    g = torch.Generator().manual_seed(0)
    d, heads, kv, hd = 24, 6, 2, 4  # 3 query heads per kv head
    group = heads // kv
    F = torch.randn(d, 5, generator=g, dtype=torch.float64)  # the boundary matrix's factor, A = F F^T
    A = F @ F.T
    Wo = torch.randn(d, heads * hd, generator=g, dtype=torch.float64)
    B = value_path_matrix(F, Wo, heads, kv)

    ref = torch.zeros(kv * hd, kv * hd, dtype=torch.float64)
    for h in range(kv):
        for q in range(h * group, (h + 1) * group):
            Wq = Wo[:, q * hd : (q + 1) * hd]  # o_proj's columns reading query head q
            ref[h * hd : (h + 1) * hd, h * hd : (h + 1) * hd] += Wq.T @ A @ Wq
    top = torch.linalg.eigvalsh(ref)[-1]
    torch.testing.assert_close(B, ref / top, **F64)
    torch.testing.assert_close(torch.linalg.eigvalsh(B)[-1], torch.tensor(1.0, dtype=torch.float64), **F64)

    # Token 0 holds the erroneous value; token 1 + q reads it through query head q only, every other head of every
    # token reads token 1 (whose value is exact): one query head per token carries the error.
    S = heads + 1
    P = torch.zeros(heads, S, S, dtype=torch.float64)
    P[:, :, 1] = 1.0
    for q in range(heads):
        P[q, 1 + q] = 0.0
        P[q, 1 + q, 0] = 1.0

    def residual(V):  # V (S, kv * hd): attention read-out, then o_proj
        v = repeat_kv(V.reshape(S, kv, hd).transpose(0, 1)[None], group)[0]  # (heads, S, hd)
        return (P @ v).transpose(0, 1).reshape(S, heads * hd) @ Wo.T

    V = torch.randn(S, kv * hd, generator=g, dtype=torch.float64)
    for _ in range(4):
        e = torch.randn(kv * hd, generator=g, dtype=torch.float64)
        dV = torch.zeros_like(V)
        dV[0] = e
        r = residual(V + dV) - residual(V)
        energy = torch.einsum("td,de,te->", r, A, r)
        torch.testing.assert_close(energy, top * (e @ B @ e), rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------- gate/up (3.5d)
def _expert(g, d, inter):
    """One SiLU expert: gate, up ``(I, d)``, down ``(d, I)``, float64."""
    Wg = torch.randn(inter, d, generator=g, dtype=torch.float64) / d**0.5
    Wu = torch.randn(inter, d, generator=g, dtype=torch.float64) / d**0.5
    Wd = torch.randn(d, inter, generator=g, dtype=torch.float64) / inter**0.5
    return Wg, Wu, Wd


def _first_order_energy(x, Wg, Wu, Wd, A, dg, du, h=1e-5):
    """Mean over tokens of ``dy_t^T A dy_t``, ``dy`` the first-order change of the real expert output
    ``W_down (silu(g) * u)`` when every token's gate / up outputs move along ``dg`` / ``du``: a central
    difference in float64 (no derivative code involved; truncation ~h^2 = 1e-10, rounding ~1e-16 / h = 1e-11)."""

    def out(s):
        return (torch.nn.functional.silu(x @ Wg.T + s * dg) * (x @ Wu.T + s * du)) @ Wd.T

    dy = (out(h) - out(-h)) / (2 * h)
    return torch.einsum("td,de,te->t", dy, A, dy).mean()


def test_up_path_matrices_equal_the_per_expert_loop():
    """Against ``W_down^T A W_down`` per expert and an elementwise loop; the norm from either side of the factor's
    Gram (rank 4 below and above the expert width)."""
    g = torch.Generator().manual_seed(1)
    for E, d, inter in ((3, 10, 6), (2, 10, 3)):
        F = torch.randn(d, 4, generator=g, dtype=torch.float64)  # A = F F^T
        A = F @ F.T
        down = torch.randn(E, d, inter, generator=g, dtype=torch.float64)
        sg = torch.rand(E, inter, generator=g, dtype=torch.float64) + 0.1
        su = torch.rand(E, inter, generator=g, dtype=torch.float64) + 0.1
        got = up_path_matrices(F, down, sg, su)
        for e in range(E):
            B = down[e].T @ A @ down[e]
            ref = torch.zeros(2 * inter, 2 * inter, dtype=torch.float64)
            for i in range(inter):
                for j in range(inter):
                    ref[i, j] = sg[e, i] * B[i, j] * sg[e, j]  # gate rows
                    ref[inter + i, inter + j] = su[e, i] * B[i, j] * su[e, j]  # up rows; no gate/up cross terms
            torch.testing.assert_close(got[e], ref / torch.linalg.eigvalsh(ref)[-1], **F64)


def test_up_path_quadratic_form_is_the_first_order_output_change():
    """``e^T M e`` against the first-order change of the down projection's output, in the A-norm.

    Many tokens: for an error on one gate or up unit, the mean energy over tokens is exactly the diagonal entry
    (the per-unit RMS is what makes it exact), so the diagonal of M is proportional to it with one constant for
    all units of both halves. One token with positive gate and up outputs: then RMS = the value itself, and the
    whole quadratic form on the gate rows and on the up rows equals the first-order energy for any error."""
    g = torch.Generator().manual_seed(2)
    d, inter, T = 12, 5, 40
    F = torch.randn(d, 4, generator=g, dtype=torch.float64)  # A = F F^T
    A = F @ F.T
    Wg, Wu, Wd = _expert(g, d, inter)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    gg, uu = x @ Wg.T, x @ Wu.T
    sig = torch.sigmoid(gg)
    d_act = sig * (1 + gg * (1 - sig))  # silu'
    s_gate = (d_act * uu).pow(2).mean(0).sqrt()
    s_up = torch.nn.functional.silu(gg).pow(2).mean(0).sqrt()
    M = up_path_matrices(F, Wd[None], s_gate[None], s_up[None])[0]
    zero = torch.zeros(inter, dtype=torch.float64)
    energies = []
    for i in range(2 * inter):
        unit = torch.zeros(inter, dtype=torch.float64)
        unit[i % inter] = 1.0
        dg, du = (unit, zero) if i < inter else (zero, unit)
        energies.append(_first_order_energy(x, Wg, Wu, Wd, A, dg, du))
    ratio = torch.stack(energies) / torch.diagonal(M)
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-8, atol=0)  # central differences

    # One token whose gate and up outputs are all positive (rows flipped to make them so).
    x1 = torch.randn(1, d, generator=g, dtype=torch.float64)
    Wg1 = Wg * torch.sign(x1 @ Wg.T).T
    Wu1 = Wu * torch.sign(x1 @ Wu.T).T
    g1, u1 = x1 @ Wg1.T, x1 @ Wu1.T
    assert (g1 > 0).all() and (u1 > 0).all()
    sig1 = torch.sigmoid(g1)
    M1 = up_path_matrices(F, Wd[None], (sig1 * (1 + g1 * (1 - sig1)) * u1), torch.nn.functional.silu(g1))[0]
    B = Wd.T @ A @ Wd
    ga, ua = (sig1 * (1 + g1 * (1 - sig1)) * u1)[0], torch.nn.functional.silu(g1)[0]
    scale = torch.linalg.eigvalsh(torch.block_diag(ga[:, None] * B * ga, ua[:, None] * B * ua))[-1]
    for _ in range(3):
        e = torch.randn(inter, generator=g, dtype=torch.float64)
        on_gate = _first_order_energy(x1, Wg1, Wu1, Wd, A, e, zero)
        on_up = _first_order_energy(x1, Wg1, Wu1, Wd, A, zero, e)
        torch.testing.assert_close(on_gate, scale * (e @ M1[:inter, :inter] @ e), rtol=1e-8, atol=0)
        torch.testing.assert_close(on_up, scale * (e @ M1[inter:, inter:] @ e), rtol=1e-8, atol=0)
    assert torch.equal(M1[:inter, inter:], torch.zeros(inter, inter, dtype=torch.float64))  # cross terms left out


# ---------------------------------------------------------------------------------------------- router (3.3/3.4)
def _row_weights_by_hand(sel, k, lam_v, lam_s, band):
    """``w_ti = (1 + lam_v phi(m_t)) (1 + lam_s [i in B_t])`` token by token in float64 Python: margins from a sort,
    tau the median of the finite margins (odd count: no median convention involved)."""
    T, E = sel.shape
    rows = sel.double().tolist()
    orders = [sorted(range(E), key=lambda i, r=r: -r[i]) for r in rows]
    margins = [r[o[k - 1]] - r[o[k]] for r, o in zip(rows, orders, strict=True)]
    finite = sorted(m for m in margins if m != float("inf"))
    assert len(finite) % 2 == 1
    tau = finite[len(finite) // 2]
    W = torch.empty(T, E, dtype=torch.float64)
    for t, (r, o, m) in enumerate(zip(rows, orders, margins, strict=True)):
        w_t = 1.0 + lam_v * torch.exp(torch.tensor(-max(m, 0.0) / tau, dtype=torch.float64)).item()
        for i in range(E):
            boundary = i == o[k - 1] or (i not in o[:k] and r[o[k - 1]] - r[i] <= band * tau)
            W[t, i] = w_t * (1.0 + lam_s * boundary)
    return W


def test_router_row_hessians_equal_per_row_weighted_gram_matrices():
    g = torch.Generator().manual_seed(3)
    T, d, E, k = 201, 8, 6, 2
    X = torch.randn(T, d, generator=g)
    sel = torch.randn(T, E, generator=g)
    H = router_row_hessians(X, sel, k, lambda_value=1.5, lambda_structure=2.0, margin_band=0.7)
    W = _row_weights_by_hand(sel, k, 1.5, 2.0, 0.7)
    assert (W.amax(1) > W.amin(1)).float().mean() > 0.5  # most tokens weigh some rows more: row-specific Hessians
    Xd = X.double()
    for i in range(E):
        w = W[:, i]
        ref = sum(w[t] * torch.outer(Xd[t], Xd[t]) for t in range(T)) / w.sum()
        mag = (Xd.abs().T * w) @ Xd.abs() / w.sum()
        _within(H[i], ref, (T + 8) * U32 * mag, f"H[{i}]")  # float32 accumulation over T tokens


def test_router_normal_equations_equal_the_dense_per_row_sums():
    """``A_i = X^T W_i X``, ``b_i = X^T W_i z_i``, ``sum_t w_ti``, against dense per-row sums, for the router's
    weight structure (a per-token base times a per-row boost) and for arbitrary weights with zeros."""
    g = torch.Generator().manual_seed(4)
    T, d, E = 150, 12, 5
    X, Z = torch.randn(T, d, generator=g), torch.randn(T, E, generator=g)
    base = torch.rand(T, 1, generator=g) + 0.5
    boost = 1.0 + 3.0 * (torch.rand(T, E, generator=g) < 0.2)
    arbitrary = torch.rand(T, E, generator=g) * (torch.rand(T, E, generator=g) > 0.3)
    for W in (base * boost, arbitrary):
        A, b, wsum = router_normal_equations(X, Z, W)
        Xd, Zd, Wd = X.double(), Z.double(), W.double()
        for i in range(E):
            w = Wd[:, i]
            A_ref = torch.zeros(d, d, dtype=torch.float64)
            b_ref = torch.zeros(d, dtype=torch.float64)
            for t in range(T):
                A_ref += w[t] * torch.outer(Xd[t], Xd[t])
                b_ref += w[t] * Zd[t, i] * Xd[t]
            # float32: a sum over T tokens (the base and boost parts add one rounding each)
            _within(A[i], A_ref, (T + 8) * U32 * ((Xd.abs().T * w) @ Xd.abs()), f"A[{i}]")
            _within(b[i], b_ref, (T + 8) * U32 * ((Xd.abs().T * w) @ Zd[:, i].abs()), f"b[{i}]")
            _within(wsum[i], w.sum(), (T + 8) * U32 * w.sum(), f"wsum[{i}]")


# ---------------------------------------------------------------------------------------------- residual metric (3.5b)
def test_boundary_matrix_equals_the_per_token_sum_in_float64():
    """``A / ||A||`` with ``A = sum_t phi_t u_t u_t^T``, ``u_t = gamma * (r_(k) - r_(k+1))``, token by token in
    float64; with and without the norm scale, and with tokens whose (k+1)-th expert is masked out (group-limited
    routers: no boundary, infinite margin, no weight, and no NaN)."""
    g = torch.Generator().manual_seed(5)
    T, E, d, k = 121, 6, 10, 2
    sel = torch.randn(T, E, generator=g)
    sel[:10, 2:] = float("-inf")  # only two experts selectable: no boundary for these tokens
    R = torch.randn(E, d, generator=g)
    gamma = torch.rand(d, generator=g) + 0.5
    rows = sel.double().tolist()
    orders = [sorted(range(E), key=lambda i, r=r: -r[i]) for r in rows]
    margins = [r[o[k - 1]] - r[o[k]] for r, o in zip(rows, orders, strict=True)]
    finite = sorted(m for m in margins if m != float("inf"))
    assert len(finite) == T - 10 and len(finite) % 2 == 1
    tau = finite[len(finite) // 2]
    # The margins and phi are computed from the float32 selection scores in float32 (the rest in float64): each
    # phi_t is off by <= (3 m_t / tau + 4) u relative (the difference, tau, the division, exp), which bounds the
    # error of A elementwise by that times sum_t phi_t |u_t| |u_t|^T, and of its top eigenvalue likewise.
    rel = (3 * max(finite) / tau + 4) * U32
    for norm in (None, gamma):
        ref = torch.zeros(d, d, dtype=torch.float64)
        mag = torch.zeros(d, d, dtype=torch.float64)
        for m, o in zip(margins, orders, strict=True):
            if m == float("inf"):
                continue
            u = R[o[k - 1]].double() - R[o[k]].double()
            if norm is not None:
                u = u * norm.double()
            phi = torch.exp(torch.tensor(-m / tau, dtype=torch.float64))
            ref += phi * torch.outer(u, u)
            mag += phi * torch.outer(u.abs(), u.abs())
        got = boundary_matrix(R, norm, sel, k)
        assert got.dtype == torch.float64 and torch.isfinite(got).all()
        top = torch.linalg.eigvalsh(ref)[-1]
        _within(got, ref / top, 2 * rel * mag / top + 1e-14, "A / ||A||")


def test_a_router_without_boundary_tokens_gives_no_directions():
    """Every margin infinite (exactly k experts eligible, e.g. group-limited routing): ``A = 0``, so the factor has
    no columns, the metric is the identity, nothing is probed, and a horizon over it keeps the later routers'."""
    from types import SimpleNamespace

    from vsraq_plugin.methods import probe_directions
    from vsraq_plugin.vsraq import boundary_factor, horizon_factor, metric

    g = torch.Generator().manual_seed(3)
    E, d, k = 6, 10, 2
    R = torch.randn(E, d, generator=g)
    sel = torch.full((5, E), float("-inf"))
    sel[:, :k] = torch.randn(5, k, generator=g)
    F = boundary_factor(R, None, sel, k)
    assert F.shape == (d, 0)
    assert torch.equal(metric(F @ F.T, 32.0), torch.eye(d))
    assert probe_directions(F, 8).shape == (0, d)
    H = horizon_factor(F, [SimpleNamespace(weight=R, norm_weight=None)], 0.5, 4)
    assert H.shape == (d, 4) and abs(float(torch.linalg.matrix_norm(H, ord=2)) - 1) < 1e-12


# ---------------------------------------------------------------------------------------------- FP targets (3.5c)
def test_damped_fp_target_is_the_ridge_least_squares_optimum():
    """Weighted tokens, damping and a column no token activates: the closed form equals lstsq of the blended target
    with a ridge toward W of strength ``damp * mean diag(H)`` (what damping H is), the dead column kept as is."""
    g = torch.Generator().manual_seed(6)
    T, d, R, alpha, damp = 300, 9, 4, 0.5, 0.05
    X = torch.randn(T, d, generator=g, dtype=torch.float64)
    Xq = X + 0.2 * torch.randn(T, d, generator=g, dtype=torch.float64)
    Xq[:, 3] = 0.0  # dead in the quantized stream (the FP stream still has it)
    w = torch.rand(T, generator=g, dtype=torch.float64) + 0.2
    W = torch.randn(R, d, generator=g, dtype=torch.float64)
    p = (w / w.sum()).sqrt()[:, None]
    H, C = (p * Xq).T @ (p * Xq), (p * Xq).T @ (p * X)
    got = writer_target(W[None], H[None], damp, C[None], alpha)[0]
    lam = damp * torch.diagonal(H).mean()
    target = alpha * X @ W.T + (1 - alpha) * Xq @ W.T  # (T, R)
    lhs = torch.cat([p * Xq, lam.sqrt() * torch.eye(d, dtype=torch.float64)])
    rhs = torch.cat([p * target, lam.sqrt() * W.T])
    ref = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(got[:, 3], W[:, 3])
    assert not torch.allclose(got, W)  # the target moved the weight
