"""The VSRAQ plan's matrix work per MoE layer at real widths: factored boundary matrices against dense ones.

Per MoE layer the plan builds two routers' boundary matrices (this router's, for o_proj and v_proj, and the next
one's, for the down projections), the down projections' horizon matrix (the next router plus the uniform-pair
matrices of the 7 after it, cut to 256 directions), the probe directions of both and their metrics. Every boundary
matrix has rank below the number of experts E; ``vsraq.py`` keeps them as factors ``F`` ``(d, r)`` and takes their
eigenpairs from the ``(r, r)`` Gram ``F^T F``. The dense path (written out here as the reference: the plan's
arithmetic before the factors) decomposes ``(d, d)`` matrices instead. Synthetic routers (Gaussian rows, RMSNorm
scales near 1) and selection scores; wall time of both, the ratio, and the largest difference of the metrics
(float32, as the solve reads them) and of the probe directions.

    OMP_NUM_THREADS=1 python benchmarks/bench_plan.py [--threads 1] [--shapes qwen3 deepseek] [--tokens 65536]

DeepSeek-V3's width (7168) takes several minutes on the dense side on one CPU thread.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from vsraq_plugin.methods import METRIC_RANK, probe_directions
from vsraq_plugin.vsraq import boundary_factor, horizon_factor, metric, value_path_matrix

# d, experts, top-k, (query heads, kv heads, head dim) of attention with a v_proj (None: MLA)
SHAPES = {
    "olmoe": (2048, 64, 8, (16, 16, 128)),
    "qwen3": (2048, 128, 8, (32, 4, 128)),
    "deepseek": (7168, 256, 8, None),
}
HORIZON, DECAY, LAM, LAM_V, PROBES = 8, 0.5, 32.0, 256.0, 8  # the pipeline's defaults


def routers(d: int, E: int, n: int, g: torch.Generator) -> list[SimpleNamespace]:
    def one() -> SimpleNamespace:
        weight = torch.randn(E, d, generator=g) / d**0.5
        return SimpleNamespace(weight=weight, norm_weight=1 + 0.1 * torch.randn(d, generator=g))

    return [one() for _ in range(n)]


def factored(views, sel, k, Wo, heads):
    F_here = boundary_factor(views[0].weight, views[0].norm_weight, sel, k)
    F_next = boundary_factor(views[1].weight, views[1].norm_weight, sel, k)
    F_down = horizon_factor(F_next, views[2:], DECAY, METRIC_RANK)
    out = {
        "down": metric(F_down @ F_down.T, LAM),
        "o": metric(F_here @ F_here.T, LAM),
        "probe_down": probe_directions(F_down, PROBES),
        "probe_o": probe_directions(F_here, PROBES),
    }
    if Wo is not None:
        out["v"] = metric(value_path_matrix(F_here, Wo, *heads[:2]), LAM_V)
    return out


def _dense_boundary(v, sel, k):
    E = sel.shape[-1]
    order = sel.topk(k + 1, dim=-1).indices
    i, j = order[:, k - 1], order[:, k]
    m = sel.gather(1, i[:, None])[:, 0] - sel.gather(1, j[:, None])[:, 0]
    phi = torch.exp(-m.clamp(min=0) / max(float(m.median()), 1e-6)).double()
    P = torch.zeros(E, E, dtype=torch.float64)
    for a, b, s in ((i, i, phi), (j, j, phi), (i, j, -phi), (j, i, -phi)):
        P.index_put_((a, b), s, accumulate=True)
    D = v.weight.double().T * v.norm_weight.double()[:, None]
    A = D @ P @ D.T
    return A / torch.linalg.eigvalsh(A)[-1]


def _dense_probes(A, n):
    lam, V = torch.linalg.eigh(A)
    keep = lam > lam[-1] * 1e-6
    lam, V = lam[keep][-n:], V[:, keep][:, -n:]
    return (V * lam.sqrt()).T.float()


def dense(views, sel, k, Wo, heads):
    A_here, A_next = _dense_boundary(views[0], sel, k), _dense_boundary(views[1], sel, k)
    A = A_next.clone()
    for j, v in enumerate(views[2:], start=1):
        D = v.weight.double().T * v.norm_weight.double()[:, None]
        Dc = D - D.mean(1, keepdim=True)
        A += DECAY**j * (Dc @ Dc.T) / torch.linalg.eigvalsh(Dc.T @ Dc)[-1]
    lam, V = torch.linalg.eigh(A)
    lam, V = lam[-METRIC_RANK:].clamp(min=0), V[:, -METRIC_RANK:]
    A_down = (V * (lam / lam[-1])) @ V.T
    out = {
        "down": metric(A_down, LAM),
        "o": metric(A_here, LAM),
        "probe_down": _dense_probes(A_down, PROBES),
        "probe_o": _dense_probes(A_here, PROBES),
    }
    if Wo is not None:
        nh, kv, hd = heads
        W = Wo.double().reshape(Wo.shape[0], kv, nh // kv, hd)
        B = torch.block_diag(*(torch.einsum("dqi,de,eqj->ij", W[:, h], A_here, W[:, h]) for h in range(kv)))
        out["v"] = metric(B / torch.linalg.eigvalsh(B)[-1], LAM_V)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["olmoe", "qwen3"], choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=65536, help="calibration tokens routed (the selection's rows)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}, tokens={args.tokens}, horizon {HORIZON} routers, rank cut {METRIC_RANK}")
    for name in args.shapes:
        d, E, k, heads = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        views = routers(d, E, HORIZON + 1, g)
        sel = torch.softmax(2 * torch.randn(args.tokens, E, generator=g), -1)
        Wo = None if heads is None else torch.randn(d, heads[0] * heads[2], generator=g) / d**0.5
        times, outs = {}, {}
        for label, fn in (("factored", factored), ("dense", dense)):
            t0 = time.perf_counter()
            outs[label] = fn(views, sel, k, Wo, heads)
            times[label] = time.perf_counter() - t0
        f, r = outs["factored"], outs["dense"]
        err_m = max(float((f[n] - r[n]).abs().max()) for n in f if not n.startswith("probe"))
        err_p = 0.0
        for n in ("probe_down", "probe_o"):
            s = torch.sign((f[n] * r[n]).sum(1, keepdim=True))  # eigenvectors are defined up to sign
            err_p = max(err_p, float((f[n] * s - r[n]).abs().max() / r[n].abs().max()))
        print(
            f"{name:9s} d={d} E={E} top-{k}: factored {times['factored']:7.2f} s  dense {times['dense']:7.2f} s  "
            f"dense/factored {times['dense'] / times['factored']:5.1f}x  max |dM| {err_m:.1e}  probes rel {err_p:.1e}"
        )


if __name__ == "__main__":
    main()
