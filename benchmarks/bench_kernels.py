"""GPU benchmark of the Triton GPTQ kernels (needs CUDA; speed on the CPU interpreter means nothing).

Dense W4A16 g128 dequant-GEMM and the fused MoE GEMM at Mixtral-8x7B and Qwen3-30B-A3B layer shapes, for
M (tokens) in {1, 4, 16, 64, 512, 4096}, each against, in the same run:
- torch fp16 matmul with the weight already dequantized (the speed of light without quantization),
- dequantize-then-matmul (torch, per call),
- a per-expert loop (MoE: dequantize each routed expert, matmul its tokens; and the same loop in fp16),
- for MoE, our own kernel with the SiLU*up epilogue switched off (two launches plus a torch activation):
  the fusion is on by default for SiLU experts; this column says whether it pays on the device.
Prints TFLOP/s, achieved GB/s of weight+activation traffic, and the ratio to the device's measured copy
bandwidth (a device-to-device copy of 2 GiB, same run).

Mixed-width MoE (``--cases mixed``, Qwen3-30B-A3B experts, widths ``--mixed-widths`` dealt round-robin to the
experts): the single launch pair that reads each expert's width from a table, side by side with one launch
pair per width (how mixed layers ran before) and with a uniform ``--bits`` layer (the constexpr-width kernel).
Only a GPU says anything about these speeds; the interpreter checks correctness only (tests/test_kernels.py).

    python benchmarks/bench_kernels.py [--bits 4] [--group-size 128] [--m 1 4 16 64 512 4096]
        [--cases dense moe mixed] [--mixed-widths 2 3 4]

Targets (issue): dense decode (M=1) >= 70 % of HBM bandwidth; fused MoE >= 2x the per-expert loop and
>= 1.5x fp16 at M <= 64.
"""

from __future__ import annotations

import argparse

import torch

DENSE = {
    "mixtral q_proj 4096x4096": (4096, 4096),
    "mixtral w1 14336x4096": (14336, 4096),
    "mixtral w2 4096x14336": (4096, 14336),
    "qwen3-30b q_proj 4096x2048": (4096, 2048),
}
MOE = {  # name: (experts, top_k, hidden, intermediate)
    "mixtral-8x7b experts": (8, 2, 4096, 14336),
    "qwen3-30b-a3b experts": (128, 8, 2048, 768),
}


def random_weight(N: int, K: int, bits: int, gs: int, device: str):
    from vsraq_plugin.kernels.layout import KernelWeight, container_bits
    from vsraq_plugin.packing import pack_codes

    G = K // gs
    codes = torch.randint(0, 2**bits, (K, N), device="cpu")
    qw = pack_codes(codes, container_bits(bits)).to(device)  # 3-bit codes in the 4-bit container, as at load
    zeros = torch.full((G, N), 2 ** (bits - 1), dtype=torch.int32, device=device)
    scales = (torch.rand(G, N, device=device) * 0.01 + 0.001).half()
    g_idx = (torch.arange(K, device=device) // gs).int()
    kw = KernelWeight(qw, zeros, scales, g_idx, container_bits(bits), K, N, gs)
    W = ((codes.to(device).float() - 2 ** (bits - 1)) * scales.float().repeat_interleave(gs, 0)).T.half()
    return kw, W.contiguous()


def copy_bandwidth() -> float:
    import triton.testing

    a = torch.empty(2**30, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a))
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e9  # read + write, GB/s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 512, 4096])
    ap.add_argument("--cases", nargs="+", choices=["dense", "moe", "mixed"], default=["dense", "moe", "mixed"])
    ap.add_argument("--mixed-widths", type=int, nargs="+", default=[2, 3, 4])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU; kernel correctness on the CPU is in tests/test_kernels.py")
    import triton.testing

    from vsraq_plugin.kernels.gptq_gemm import dequant_gemm
    from vsraq_plugin.kernels.moe_gemm import fused_moe, stack_experts
    from vsraq_plugin.packing import unpack_codes

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(
        f"device {torch.cuda.get_device_name()}, measured copy bandwidth {bw:.0f} GB/s, W{args.bits}g{args.group_size}"
    )

    def deq(kw):
        codes = unpack_codes(kw.qweight, kw.in_features, kw.bits)
        s = kw.scales.float()[kw.g_idx.long()]
        z = kw.zeros.float()[kw.g_idx.long()]
        return ((codes.float() - z) * s).T.half()

    worst = 0.0  # largest relative error of a kernel against dequantize-then-matmul in float32, over every case

    def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
        return float((got.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))

    if "dense" in args.cases:
        print(
            "\n| dense layer | M | ours TFLOP/s | ours GB/s | % of copy BW | fp16 matmul x | dequant+matmul x", end=""
        )
        print(" | rel err |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, (N, K) in DENSE.items():
            kw, W = random_weight(N, K, args.bits, args.group_size, "cuda")
            for M in args.m:
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                err = rel_err(dequant_gemm(x, kw), x.float() @ deq(kw).float().T)
                worst = max(worst, err)
                t_ours = triton.testing.do_bench(lambda: dequant_gemm(x, kw))
                t_fp16 = triton.testing.do_bench(lambda: x @ W.T)
                t_deq = triton.testing.do_bench(lambda: x @ deq(kw).T)
                flops = 2 * M * N * K
                bytes_ = K * N * args.bits / 8 + N * K // args.group_size * 6 + 2 * M * (K + N)
                gbs = bytes_ / (t_ours * 1e-3) / 1e9
                print(
                    f"| {name} | {M} | {flops / t_ours / 1e9:.1f} | {gbs:.0f} | {100 * gbs / bw:.0f} % | "
                    f"{t_fp16 / t_ours:.2f} | {t_deq / t_ours:.2f} | {err:.1e} |",
                    flush=True,
                )

    def loop(x, ids, w, gu, dn, fp16: bool):
        """The per-expert loop: each routed expert dequantized (or its fp16 copy), its tokens multiplied."""
        out = torch.zeros(x.shape[0], dn[0][0].out_features, device="cuda", dtype=torch.float16)
        for e in range(len(gu)):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            Wgu = gu[e][1] if fp16 else deq(gu[e][0])
            Wd = dn[e][1] if fp16 else deq(dn[e][0])
            g, u = (x[tok] @ Wgu.T).chunk(2, -1)
            out.index_add_(0, tok, (torch.nn.functional.silu(g) * u) @ Wd.T * w[tok, slot, None])
        return out

    def experts(widths, d, inter, group_size):
        """Random experts of the given widths (each a gate/up and a down), and their stacked kernel layouts."""
        gu = [random_weight(2 * inter, d, b, group_size, "cuda") for b in widths]
        dn = [random_weight(d, inter, b, group_size, "cuda") for b in widths]
        return gu, dn, stack_experts([g for g, _ in gu]), stack_experts([g for g, _ in dn])

    def routed(T, E, k, d):
        """T tokens' activations, top-k expert ids and routing weights."""
        x = torch.randn(T, d, device="cuda", dtype=torch.float16)
        ids = torch.randn(T, E, device="cuda").topk(k, dim=-1).indices
        return x, ids, torch.softmax(torch.randn(T, k, device="cuda"), -1).half()

    if "moe" in args.cases:
        print("\n| MoE layer | tokens | ours ms | per-expert dequant loop x | fp16 per-expert loop x", end="")
        print(" | unfused SiLU x | rel err |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, (E, k, d, inter) in MOE.items():
            gu, dn, gu_s, dn_s = experts([args.bits] * E, d, inter, args.group_size)
            for T in args.m:
                x, ids, w = routed(T, E, k, d)
                err = rel_err(fused_moe(x, gu_s, dn_s, ids, w), loop(x, ids, w, gu, dn, False))
                worst = max(worst, err)
                t_ours = triton.testing.do_bench(lambda: fused_moe(x, gu_s, dn_s, ids, w))
                t_loop = triton.testing.do_bench(lambda: loop(x, ids, w, gu, dn, False))
                t_fp16 = triton.testing.do_bench(lambda: loop(x, ids, w, gu, dn, True))
                t_unfused = triton.testing.do_bench(lambda: fused_moe(x, gu_s, dn_s, ids, w, fuse_act=False))
                print(
                    f"| {name} | {T} | {t_ours:.3f} | {t_loop / t_ours:.2f} | {t_fp16 / t_ours:.2f} | "
                    f"{t_unfused / t_ours:.2f} | {err:.1e} |",
                    flush=True,
                )

    if "mixed" in args.cases:
        E, k, d, inter = MOE["qwen3-30b-a3b experts"]
        widths = [args.mixed_widths[e % len(args.mixed_widths)] for e in range(E)]
        gu, dn, gu_s, dn_s = experts(widths, d, inter, args.group_size)
        per_width = []  # how mixed layers ran before: experts grouped by width, one launch pair per group
        for b in sorted(set(widths)):
            members = [e for e in range(E) if widths[e] == b]
            local = torch.full((E,), -1, dtype=torch.long, device="cuda")
            local[members] = torch.arange(len(members), device="cuda")
            per_width.append(
                (local, stack_experts([gu[e][0] for e in members]), stack_experts([dn[e][0] for e in members]))
            )
        uni_gu = [random_weight(2 * inter, d, args.bits, args.group_size, "cuda")[0] for _ in range(E)]
        uni_dn = [random_weight(d, inter, args.bits, args.group_size, "cuda")[0] for _ in range(E)]
        uni_gu_s, uni_dn_s = stack_experts(uni_gu), stack_experts(uni_dn)

        def grouped(x, ids, w):
            out = None
            for local, g_s, d_s in per_width:  # -1: routed to an expert of another width, left out
                y = fused_moe(x, g_s, d_s, local[ids], w)
                out = y if out is None else out + y
            return out

        name = f"qwen3-30b-a3b experts, widths {'/'.join(map(str, args.mixed_widths))}"
        print(
            f"\n| mixed-width MoE layer | tokens | one launch pair ms | {len(per_width)} launch pairs (per width) x",
            end="",
        )
        print(f" | uniform W{args.bits} ms | one pair / uniform | rel err |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for T in args.m:
            x, ids, w = routed(T, E, k, d)
            err = rel_err(fused_moe(x, gu_s, dn_s, ids, w), loop(x, ids, w, gu, dn, False))
            worst = max(worst, err)
            t_one = triton.testing.do_bench(lambda: fused_moe(x, gu_s, dn_s, ids, w))
            t_grouped = triton.testing.do_bench(lambda: grouped(x, ids, w))
            t_uni = triton.testing.do_bench(lambda: fused_moe(x, uni_gu_s, uni_dn_s, ids, w))
            print(
                f"| {name} | {T} | {t_one:.3f} | {t_grouped / t_one:.2f} | {t_uni:.3f} | {t_one / t_uni:.2f} | "
                f"{err:.1e} |",
                flush=True,
            )
    # fp16 outputs and fp16 intermediates (the MoE reference rounds its activations to fp16 too): a few 1e-3.
    ok = worst < 1e-2
    print(f"\nkernels at real shapes: largest relative error {worst:.1e}: {'PASS' if ok else 'FAIL'} (< 1e-2)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
