"""Everything torch.distributed: one `World` value, made from a `torchrun` launch, and the collectives training needs.

    torchrun --nproc-per-node N -m saescope train ...   (nccl on CUDA, gloo on CPU)

In an ordinary process the world is trivial (rank 0 of 1, mode "single") and every method below is the
single-process expression itself, so that code path and its numbers stay exactly as they were.

Modes (see README, "Many GPUs"):
- data: every rank harvests its own shard of the corpus (contexts i with i % size == rank) and trains every
  SAE; gradients are summed over ranks, each rank's weighted by its share of the step's rows, so the step is
  the one a single process takes on the union of the ranks' rows. From a cache every rank reads the same
  chunks and takes its slice of every step, so the union is exactly the single-process batch.
  Not exact: where a step's first 64 rows (the aux-k rows) span ranks (slices under 64 rows) each rank
  normalises its part of the aux-k loss by its own rows' error variance; ties at the BatchTopK cut may keep a
  different set of equal values; live harvests read the corpus in another order than one process does.
- layers: every rank harvests its shard, the activations are exchanged (one all_to_all per chunk, with each
  rank's own row count: nothing trimmed, nothing padded) and each rank trains the SAEs of its own layers on all
  ranks' rows, in rank order.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .errors import SaescopeError

MODES = ("single", "data", "layers")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes. The default is a plain single process."""

    rank: int = 0
    size: int = 1
    mode: str = "single"
    device: str = "cpu"  # where collectives' tensors live: cuda:LOCAL_RANK with nccl, cpu with gloo

    @property
    def trivial(self) -> bool:
        return self.size == 1

    @property
    def describe(self) -> dict:
        return {"world_size": self.size, "mode": self.mode}

    # ---------------------------------------------------------------- small collectives

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce `t` in place with `op` (sum, max, min); returns it."""
        if not self.trivial:
            import torch.distributed as dist

            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(t, op=ops[op])
        return t

    def sum_floats(self, *values: float) -> list[float]:
        """Sums over ranks of a few numbers (one call), in float64."""
        if self.trivial:
            return list(values)
        return self._reduce(torch.tensor(values, dtype=torch.float64, device=self.device), "sum").tolist()

    def all_true(self, flag: torch.Tensor) -> bool:
        """True when `flag` (a boolean scalar) holds on every rank."""
        if self.trivial:
            return bool(flag)
        return bool(self._reduce(flag.to(self.device, torch.int32).reshape(1), "min").item())

    def any_(self, mask: torch.Tensor) -> torch.Tensor:
        """A boolean mask that is True where it is True on any rank (in place)."""
        if not self.trivial:
            mask.copy_(self._reduce(mask.to(self.device, torch.int32), "max").to(mask.device).bool())
        return mask

    def gather_ints(self, n: int) -> list[int]:
        """Every rank's `n`, in rank order."""
        if self.trivial:
            return [n]
        t = torch.zeros(self.size, dtype=torch.int64, device=self.device)
        t[self.rank] = n
        return self._reduce(t, "sum").tolist()

    def gather_objects(self, obj) -> list:
        if self.trivial:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if not self.trivial:
            import torch.distributed as dist

            dist.barrier()

    # ---------------------------------------------------------------- what the trainer needs

    def row_mean(self, t: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Mean over dim 0 of the global batch of `n_rows` rows, of which this rank holds `t`."""
        if self.trivial:
            return t.mean(0)
        return self._reduce(t.sum(0).to(self.device), "sum").to(t.device) / n_rows

    def kth_largest(self, z: torch.Tensor, k: int, n_rows: int) -> torch.Tensor:
        """Per column, the k-th largest value of the global batch (or its smallest, when it has fewer rows)."""
        if self.trivial:
            return z.topk(min(k, z.shape[0]), dim=0).values[-1]
        k = min(k, n_rows)
        local = z.topk(min(k, z.shape[0]), dim=0).values  # the global top k of a column are among the ranks' top k
        padded = local.new_full((k, z.shape[1]), float("-inf"))
        padded[: local.shape[0]] = local
        every = self._all_gather(padded)
        return every.topk(k, dim=0).values[-1]

    def all_rows(self, t: torch.Tensor, n_rows: int) -> torch.Tensor:
        """The global batch of `n_rows` rows, of which this rank holds `t`, in rank order (the same everywhere)."""
        if self.trivial:
            return t
        counts = self.gather_ints(t.shape[0])
        padded = t.new_zeros((max(counts), *t.shape[1:]))
        padded[: t.shape[0]] = t
        every = self._all_gather(padded).view(self.size, max(counts), *t.shape[1:])
        return torch.cat([every[r, :c] for r, c in enumerate(counts)])

    def top_values(self, flat: torch.Tensor, k: int):
        """The entries of `flat` that are among the global batch's k largest: (values, indices) like topk."""
        local = flat.topk(min(flat.numel(), k), sorted=False)
        if self.trivial:
            return local
        padded = local.values.new_full((k,), float("-inf"))
        padded[: local.values.numel()] = local.values
        every = self._all_gather(padded)
        cut = every.topk(min(k, int(torch.isfinite(every).sum())), sorted=False).values.min()
        keep = local.values >= cut
        return torch.return_types.topk((local.values[keep], local.indices[keep]))

    def min_positive(self, values: torch.Tensor) -> float:
        """The smallest positive value over every rank's `values` (0 when there is none)."""
        pos = values[values > 0]
        if self.trivial:
            return float(pos.min()) if pos.numel() else 0.0
        m = pos.min().reshape(1).to(self.device) if pos.numel() else torch.full((1,), float("inf"), device=self.device)
        out = float(self._reduce(m.float(), "min").item())
        return out if out != float("inf") else 0.0

    def reduce_grads(self, params: list[torch.Tensor], weight: float) -> None:
        """Gradients of the global step: Σ over ranks of weight·grad, as one flat bucket (one call)."""
        if self.trivial:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        flat.mul_(weight)
        self._reduce(flat, "sum")
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (same shape everywhere), concatenated along dim 0 in rank order."""
        import torch.distributed as dist

        out = [torch.empty_like(t, device=self.device) for _ in range(self.size)]
        dist.all_gather(out, t.to(self.device).contiguous())
        return torch.cat(out).to(t.device)

    def exchange(self, send: list[torch.Tensor], recv_rows: list[int], width: int) -> torch.Tensor:
        """all_to_all: send[q] (n_mine, width_q) goes to rank q; returns (Σ recv_rows, width), rows in rank order."""
        import torch.distributed as dist

        flat = torch.cat([s.reshape(-1) for s in send]).to(self.device)
        out = torch.empty(sum(recv_rows) * width, dtype=flat.dtype, device=self.device)
        dist.all_to_all_single(out, flat, [n * width for n in recv_rows], [s.numel() for s in send])
        return out.view(sum(recv_rows), width).to(send[0].device)


SINGLE = World()


def from_env(parallel: str = "auto", device: str = "cpu") -> World:
    """The world of this process: from torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or a single process.

    Initialises the default process group (nccl when `device` is CUDA, gloo otherwise) when torchrun
    started more than one process and no group exists yet."""
    if parallel not in ("auto", *MODES[1:]):
        raise SaescopeError(f"unknown --parallel '{parallel}': choose auto, data or layers")
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return SINGLE
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)  # "cuda" now means this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank=rank, size=size, mode="data" if parallel == "auto" else parallel,
                 device=f"cuda:{local}" if cuda else "cpu")


@contextlib.contextmanager
def launched(parallel: str = "auto", device: str = "cpu"):
    """`from_env`, and the process group torn down afterwards when this call made it."""
    import torch.distributed as dist

    made = dist.is_available() and not dist.is_initialized()
    world = from_env(parallel, device)
    try:
        yield world
    finally:
        if made and not world.trivial and dist.is_initialized():
            dist.destroy_process_group()


def first_process() -> bool:
    """True in an ordinary process and in torchrun's rank 0 (for what one process should print)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def one_process(verb: str) -> None:
    """Refuse a verb that writes shared files from every process when torchrun started several."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise SaescopeError(f"`saescope {verb}` is one process: under torchrun use `saescope train`, and run "
                            f"{verb} in one process")


def shard(items, world: World):
    """This rank's share of a stream: items i with i % size == rank."""
    import itertools

    return items if world.trivial else itertools.islice(items, world.rank, None, world.size)


def owner_of(layer: int, layers: list[int], world: World) -> int:
    """Layer parallel: the rank that trains `layer`'s SAEs (layers dealt out in turn)."""
    return sorted(layers).index(layer) % world.size


def synced(chunks, world: World):
    """Each rank's own chunks, taken in step: every chunk learns every rank's row count (`rows_per_rank`);
    all ranks stop together when one runs out (else the others would wait for it forever)."""
    it = iter(chunks)
    while True:
        chunk = next(it, None)
        n = next(iter(chunk.acts.values())).shape[0] if chunk is not None else -1
        sizes = world.gather_ints(n)
        if chunk is None or min(sizes) < 0:  # every rank gathered first: a collective call
            return
        yield chunk._replace(rows_per_rank=tuple(sizes))


def exchanged(chunks, world: World, owners: dict[str, int]):
    """Layer parallel: each rank's own chunks in, chunks of this rank's sites with every rank's rows out.

    One all_to_all per chunk; ranks may hold different row counts (BOS/EOS/pad dropped), so each sends
    exactly its rows: nothing is trimmed or padded. Rows come in rank order; `n_contexts` stays this
    rank's own (its position in its shard)."""
    keys = sorted(owners)
    mine = [k for k in keys if owners[k] == world.rank]
    for chunk in synced(chunks, world):
        widths = [chunk.acts[k].shape[1] for k in mine]
        send = [torch.cat([chunk.acts[k] for k in keys if owners[k] == q], dim=1) for q in range(world.size)]
        got = world.exchange(send, list(chunk.rows_per_rank), sum(widths))
        acts = {k: v.contiguous() for k, v in zip(mine, got.split(widths, dim=1))}
        yield chunk._replace(acts=acts, rows_per_rank=None)
