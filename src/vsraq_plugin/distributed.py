"""Quantization on several processes with ``torch.distributed`` (DESIGN 7): ``torchrun ... -m vsraq_plugin quantize``.

What is split and how the result stays independent of the number of ranks N:

- **Calibration batches**: rank r holds a contiguous block of the batches (``batch_range``), so the ranks'
  tokens, gathered in rank order, are the tokens of one process in its own order.
- **Sums over tokens** (Hessians, the FP-target cross-Grams, the router's normal equations): every batch's
  term is computed in float32 exactly as one process computes it, added into a float64 sum, and the partial
  sums are all-reduced in float64. Float64 sums of float32 terms are exact unless one entry's per-batch terms
  span more than about 2^25 in magnitude, so the reduced sums do not depend on N (and when they do, by one
  float64 ulp). A single process does the same (``QuantConfig.exact_sums``, on by default), so a plain run and
  a torchrun of any size write the same checkpoint; ``exact_sums=False`` keeps float32 running sums (one process).
- **Per-token quantities** (FP router logits, margins): gathered whole on every rank, in canonical order; the
  plan computes them once, identically everywhere, and each rank takes the slice of its own tokens.
- **Solves**: a stage's matrices (the experts of a layer, or the linears of a stage) are assigned to owner ranks
  by cost (longest first onto the least loaded rank); each owner solves its share and broadcasts the codes and
  grids; every rank rebuilds the dequantized weights from them (the solver's own arithmetic, so bit for bit).
- **Writing**: rank 0 writes the checkpoint and the resume state; each rank keeps its own calibration streams
  in the resume dir.
- **Failure**: every collective has a timeout (``QuantConfig``-independent, ``--dist-timeout``); a rank that dies
  makes the others stop with ``DistributedError`` instead of hanging.

With no process group (and no ``torchrun`` environment) everything here is a no-op for one process.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died or hung. The message says how to recover."""


class Dist:
    """The ranks of a run; ``Dist()`` is the single process. Counts the bytes its collectives move."""

    def __init__(self, rank: int = 0, world: int = 1, group=None, timeout_s: float = 600.0, device=None) -> None:
        self.rank, self.world, self.group, self.timeout_s = rank, world, group, timeout_s
        self.bytes_moved = 0
        # NCCL moves CUDA tensors only: host tensors (FP logits kept on the host) travel through this device.
        self.comm_device = device if device is not None and torch.device(device).type == "cuda" else None

    # ------------------------------------------------------------------ construction
    @staticmethod
    def launched() -> bool:
        """Whether this process was started by torchrun (or another launcher setting the env:// variables)."""
        return "RANK" in os.environ and "WORLD_SIZE" in os.environ

    @classmethod
    def from_env(cls, device: torch.device, timeout_s: float = 600.0) -> Dist:
        """The process group of this run: an existing one, one made from torchrun's environment (NCCL for CUDA,
        gloo otherwise), or the single process."""
        if not dist.is_available():
            return cls()
        if not dist.is_initialized():
            if not cls.launched():
                return cls()
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            except Exception as exc:
                raise DistributedError(
                    f"cannot join the process group ({type(exc).__name__}: {exc}); check MASTER_ADDR/MASTER_PORT and "
                    "that every rank was started (torchrun --nproc-per-node N -m vsraq_plugin quantize ...)."
                ) from exc
        return cls(dist.get_rank(), dist.get_world_size(), None, timeout_s, device)

    @property
    def active(self) -> bool:
        """Whether results must be reduced and shared: a process group exists (even of one rank)."""
        return dist.is_available() and dist.is_initialized()

    @property
    def writer(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ work split
    def batch_range(self, n_batches: int) -> range:
        """This rank's contiguous block of the calibration batches (sizes differ by at most one)."""
        base, extra = divmod(n_batches, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def owners(self, costs: list[float]) -> list[int]:
        """An owner rank per item: longest first onto the least loaded rank (ties: lower rank, lower index)."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += costs[i]
        return owner

    # ------------------------------------------------------------------ collectives
    def _guard(self, what: str, fn: Callable[[], object]):
        try:
            return fn()
        except RuntimeError as exc:  # gloo and NCCL report timeouts and lost peers as RuntimeError subclasses
            raise DistributedError(
                f"rank {self.rank}: {what} across {self.world} ranks failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); another rank died or stopped answering within "
                f"{self.timeout_s:.0f} s. Look at its log, then rerun the same command with the same --resume-dir "
                "to resume after the last finished layer."
            ) from exc

    def _staged(self, t: torch.Tensor, op: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Run an in-place collective on ``t``, through the communication device when ``t`` is not on it."""
        if self.comm_device is None or t.device == torch.device(self.comm_device):
            op(t)
            return t
        buf = t.to(self.comm_device)
        op(buf)
        t.copy_(buf)
        return t

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks (float64 sums stay float64)."""
        if not self.active or self.world == 1:
            return t
        self.bytes_moved += t.numel() * t.element_size()
        return self._staged(t, lambda x: self._guard("a sum", lambda: dist.all_reduce(x, op=dist.ReduceOp.SUM)))

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        if not self.active or self.world == 1:
            return t
        self.bytes_moved += t.numel() * t.element_size()
        return self._staged(t, lambda x: self._guard("a broadcast", lambda: dist.broadcast(x, src=src)))

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0 in rank order (the sizes along dim 0 may differ)."""
        if not self.active or self.world == 1:
            return t
        home = t.device
        if self.comm_device is not None:
            t = t.to(self.comm_device)
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        self._guard("a size exchange", lambda: dist.all_gather(sizes, n))
        sizes = [int(s) for s in sizes]
        pad = max(sizes)
        buf = t.new_zeros((pad, *t.shape[1:]))
        buf[: t.shape[0]] = t
        out = [torch.empty_like(buf) for _ in range(self.world)]
        self.bytes_moved += buf.numel() * buf.element_size() * self.world
        self._guard("a gather", lambda: dist.all_gather(out, buf.contiguous()))
        return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)]).to(home)

    def all_gather_object(self, obj) -> list:
        """Small Python values (fallback reports, summaries) from every rank, in rank order."""
        if not self.active or self.world == 1:
            return [obj]
        out: list = [None] * self.world
        self._guard("an exchange of reports", lambda: dist.all_gather_object(out, obj))
        return out

    def barrier(self) -> None:
        if self.active and self.world > 1:
            self._guard("a barrier", dist.barrier)


SINGLE = Dist()
