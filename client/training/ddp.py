"""Several devices at one site: one local round split over N processes with torch.distributed.

Launched by the site's worker for the round (torch.multiprocessing spawn of N ranks on this host, NCCL on
CUDA, gloo on CPU); rank 0 hands the trained weights back and the site sends ONE reply, so SecAgg+ sees one
site and one share (only the worker process talks to Flower; the ranks never do).

Semantics, chosen so that N processes compute the update of ONE process on the same global batch:
- Every rank draws the same global batch and the same augmentations (same seeds); each runs the model's
  forward/backward on its contiguous slice only, and the slices' projections are all-gathered with autograd
  (torch.distributed.nn.functional.all_gather), so the contrastive loss sees every negative of the global
  batch, as in one process. Each rank then holds N x its slice's share of the gradient; one all_reduce average
  of the flattened gradients gives every rank the global-batch gradient. (Not DDP's module reducer: heads such
  as BYOL's predictor run on the gathered projections outside the wrapped forward, which the reducer forbids.)
  Clipping, the proximal term and the optimizer step then run identically on every rank.
- BatchNorm: SyncBatchNorm on CUDA (global-batch statistics, as in one process; per-device statistics would
  let a contrastive model tell its own slice's images apart). torch's SyncBatchNorm refuses CPU tensors, so on
  CPU/gloo BatchNorm is per replica and the running statistics are averaged over the ranks at the end; GroupNorm
  models (model-norm "group") are exact on every backend.
- Sample-level DP (dp = "sample", client/training/sample_dp.py): ONE Poisson draw of the global batch per step
  (rank 0's secret seed, broadcast, so every rank draws the same mask) and the same augmentations on every
  rank; each rank computes the per-image gradients of its slice (`rank_slices`) and clips each image to
  dp-clip (an image lives on one rank, so its clipping is exactly one process's); opacus's Distributed
  optimizers sum the clipped gradients over the ranks and add the Gaussian noise ONCE, on rank 0 (std
  dp-noise x dp-clip on the sum), then divide by the GLOBAL expected batch. Every rank steps the same
  accountant; rank 0's history comes back, and the worker writes the site's one ledger entry (the ranks never
  touch the ledger). So ε, the update and its noise are those of one process on the same global batch.
A rank that dies or raises fails the whole round with DistributedTrainingError (the worker's error reply
carries a code); the other ranks are terminated, nothing is left running, and the next round starts fresh.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedrad.client.site.site_data import SiteData
    from fedrad.client.training.sample_dp import SampleDP
    from fedrad.client.training.trainer import TrainConfig, TrainResult

DEFAULT_TIMEOUT_S = 6 * 3600.0  # a round's ranks are stopped after this; the round timeout is the real bound
RESULT_FILE = "rank0.pt"


class DistributedTrainingError(RuntimeError):
    """A rank died, raised or timed out: the round fails at this site."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_slices(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) rows of a global batch of `n` for each of `world` ranks, in rank order (sizes
    differ by at most one; with n < world the last ranks get empty slices)."""
    if n < 0 or world < 1:
        raise ValueError(f"cannot split {n} rows over {world} processes")
    base, extra = divmod(n, world)
    out, start = [], 0
    for r in range(world):
        size = base + (1 if r < extra else 0)
        out.append((start, start + size))
        start += size
    return out


class GatheredForward:
    """What the objective calls as `model`: forward on this rank's slice of the global batch, then the
    all-gathered projections of the whole batch (autograd flows back to each rank's slice)."""

    def __init__(self, module: nn.Module, rank: int, world: int) -> None:
        self.module, self.rank, self.world = module, rank, world

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F
        from torch.distributed.nn.functional import all_gather

        if x.shape[0] < self.world:  # every rank's forward feeds the gather: none may be empty
            raise ValueError(f"a batch of {x.shape[0]} rows cannot be split over {self.world} processes")
        bounds = rank_slices(x.shape[0], self.world)
        start, end = bounds[self.rank]
        local = self.module(x[start:end])
        longest = max(e - s for s, e in bounds)
        if local.shape[0] < longest:  # all_gather needs equal shapes: pad, then drop the padding
            local = F.pad(local, (0, 0) * (local.dim() - 1) + (0, longest - local.shape[0]))
        with warnings.catch_warnings():  # deprecated for a private replacement; still the autograd one
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(local)
        return torch.cat([p[: e - s] for p, (s, e) in zip(parts, bounds, strict=True)], dim=0)

    def __getattr__(self, name: str) -> Any:  # heads (predictor), backbone, training flag: the module's
        return getattr(self.module, name)


@dataclasses.dataclass
class RankContext:
    """Handed to trainer.train_local by a rank: how to call the model and how to average the gradients."""

    rank: int
    world: int
    device: str = "cpu"  # where the collectives' tensors live (NCCL: this rank's CUDA device)

    def slice(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) rows of a global batch of `n` (`rank_slices`)."""
        return rank_slices(n, self.world)[self.rank]

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank (e.g. the seed of the site's one Poisson draw per step)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of `t` (a detached copy; `t` is left as it is)."""
        import torch.distributed as dist

        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    def wrap(self, model: nn.Module) -> GatheredForward:
        return GatheredForward(model, self.rank, self.world)

    def sync_grads(self, params: list[torch.Tensor]) -> None:
        """Average the gradients over the ranks with one all_reduce of their flattened copy."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        flat = _flatten_dense_tensors([p.grad for p in with_grad])
        dist.all_reduce(flat)
        flat.div_(self.world)
        for p, synced in zip(with_grad, _unflatten_dense_tensors(flat, [p.grad for p in with_grad]), strict=True):
            p.grad.copy_(synced)

    def average_buffers(self, model: nn.Module) -> None:
        """Per-replica BatchNorm running statistics -> their mean over the ranks (rank 0 sends them)."""
        import torch.distributed as dist

        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(self.world)


def _rank_main(rank: int, world: int, port: int, model: nn.Module, data: SiteData, cfg: TrainConfig,
               proximal: Any, dp: SampleDP | None, out_dir: str, threads: int) -> None:
    """One rank: join the group, train on its slice, rank 0 saves the weights and the result."""
    import datetime

    import torch
    import torch.distributed as dist

    from fedrad.client.training.trainer import resolve_device, train_local

    if threads > 0:
        torch.set_num_threads(threads)
    # torch.multiprocessing hands tensors over in shared memory: without a private copy every rank would
    # step the SAME weights (N updates per step).
    model = copy.deepcopy(model)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    cfg = dataclasses.replace(cfg, device=str(device))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        ctx = RankContext(rank, world, str(device))
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        result = train_local(model, data, cfg, progress=False, proximal=proximal, dp=dp, dist_ctx=ctx)
        if device.type != "cuda":
            ctx.average_buffers(model)
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            tmp = Path(out_dir) / (RESULT_FILE + ".tmp")
            torch.save({"state": state, "result": dataclasses.asdict(result)}, tmp)
            tmp.rename(Path(out_dir) / RESULT_FILE)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_distributed(model: nn.Module, data: SiteData, cfg: TrainConfig, procs: int,
                      proximal: tuple[float, dict[str, torch.Tensor]] | None = None,
                      dp: SampleDP | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> TrainResult:
    """trainer.train_local over `procs` processes (see the module docstring); the trained weights are loaded
    into `model`. procs <= 1 is the single-process path itself."""
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    from fedrad.client.training.trainer import TrainResult, resolve_device, train_local

    if procs <= 1:
        return train_local(model, data, cfg, progress=False, proximal=proximal, dp=dp)
    if resolve_device(cfg.device).type == "cuda" and torch.cuda.device_count() < procs:
        raise ValueError(f"{procs} processes asked for, {torch.cuda.device_count()} CUDA devices visible")
    threads = max(1, torch.get_num_threads() // procs)
    out_dir = tempfile.mkdtemp(prefix="fedrad-ddp-")
    shared = copy.deepcopy(model).to("cpu")  # moved to shared memory by the spawn, the caller's model is not
    try:
        ctx = mp.start_processes(_rank_main, nprocs=procs, join=False, start_method="spawn",
                                 args=(procs, _free_port(), shared, data, cfg, proximal, dp, out_dir, threads))
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise DistributedTrainingError(f"the {procs} training processes did not finish "
                                                   f"in {timeout_s:.0f} s")
        except ProcessException as exc:  # a rank raised or died: join() already stopped the others
            raise DistributedTrainingError(f"training process {exc.error_index} of {procs} failed: "
                                           f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from exc
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        payload = torch.load(Path(out_dir) / RESULT_FILE, weights_only=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    model.load_state_dict(payload["state"], strict=True)
    return TrainResult(**payload["result"])


__all__ = ["DistributedTrainingError", "GatheredForward", "RankContext", "rank_slices", "train_distributed"]
