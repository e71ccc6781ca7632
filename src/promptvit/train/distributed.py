"""Data-parallel training under ``torchrun`` (``torchrun --nproc_per_node N -m promptvit train ...``).

torchrun starts N processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address;
the engine then behaves as one run with the same *global* batch size:

- each global batch of the single-process run (the same seeded shuffle) is split across the ranks:
  rank r takes positions ``r, r + N, r + 2N, ...`` of it (``DistributedSampler``'s layout), so the N local
  batches of a step together hold exactly the single-process batch (``ShardedBatches``);
- after every backward the tuned parameters' gradients are averaged across ranks (an all-reduce), so every
  rank takes the same optimiser step; gradients are averaged here rather than through
  ``DistributedDataParallel`` because methods call the model outside ``forward`` (auxiliary losses, the
  cached-prefix path), which DDP's reducer does not see;
- training loss sums are gathered across ranks; validation runs on every rank over the whole validation
  set (identical results), so selection agrees everywhere;
- rank 0 is the only writer (checkpoints, artifact, logs, metrics); every rank reads the checkpoint on
  resume, so a run killed on any rank continues from its last finished epoch.

The split is exact when the training set size is a multiple of the global batch and the global batch a
multiple of N; otherwise the last batch is padded by repeating some of its items.
Batch-dependent state (BatchNorm statistics of methods that train the backbone) is per rank.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator

import torch
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int


def launched() -> Ranks | None:
    """The process's place when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def is_writer() -> bool:
    """Rank 0 (or a plain single process): the one process that writes run files."""
    ranks = launched()
    return ranks is None or ranks.rank == 0


def setup(device: torch.device) -> tuple[Ranks | None, torch.device]:
    """Join the process group (once) and pick this rank's device: ``cuda:LOCAL_RANK`` on GPUs."""
    ranks = launched()
    if ranks is None:
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if ranks.rank != 0:  # one copy of the per-epoch lines, from rank 0
        logging.getLogger("promptvit").setLevel(logging.WARNING)
    return ranks, device


class ShardedBatches:
    """This rank's share of each batch the single-process training loader would yield.

    The global index batches come from a DataLoader over ``range(len(dataset))`` built like the engine's
    (global batch size, ``shuffle=True``, the epoch's generator), started on every ``iter()`` as a
    DataLoader is, so the shuffle matches the single-process run draw for draw (as ``CachedBatches`` does).
    Rank ``r`` takes positions ``r, r + N, ...`` of each global batch; a last batch that does not split
    evenly is padded by wrapping around inside it, so every rank runs the same number of equal steps.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        global_batch: int,
        generator: torch.Generator,
        ranks: Ranks,
        num_workers: int = 0,
        pin_memory: bool = False,
        batch_sampler: Iterable[list[int]] | None = None,
    ) -> None:
        if global_batch % ranks.world_size:
            from promptvit.methods.base import ConfigError

            raise ConfigError(
                f"train.batch_size {global_batch} (the global batch) must be a multiple of the "
                f"{ranks.world_size} processes torchrun started"
            )
        self.dataset, self.ranks = dataset, ranks
        self.num_workers, self.pin_memory = num_workers, pin_memory
        if batch_sampler is not None:  # fixed global index batches (the class-balanced sampler)
            self.indices = DataLoader(range(len(dataset)), batch_sampler=batch_sampler)
        else:
            self.indices = DataLoader(
                range(len(dataset)), batch_size=global_batch, shuffle=True, generator=generator
            )

    def __len__(self) -> int:
        return len(self.indices)

    def share(self, batch: list[int]) -> list[int]:
        """Positions ``rank, rank + N, ...`` of ``batch``, wrapped around to ``ceil(len / N)`` items."""
        world = self.ranks.world_size
        size = -(-len(batch) // world)
        padded = (batch * world)[: size * world]
        return padded[self.ranks.rank :: world]

    def __iter__(self) -> Iterator:
        # Start the index DataLoader now, as DataLoader.__iter__ does (tqdm may call iter() an extra time).
        return self._load(iter(self.indices))

    def _load(self, indices: Iterator[torch.Tensor]) -> Iterator:
        shares = (self.share(batch.tolist()) for batch in indices)
        # A private generator: the item loader's own seed draw must not move the global RNG.
        yield from DataLoader(
            self.dataset,
            batch_sampler=shares,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator(),
        )


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Mean of every parameter's gradient over the ranks (a no-op in a single process)."""
    if launched() is None:
        return
    world = dist.get_world_size()
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad.div_(world)


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks (the values themselves in a single process)."""
    if launched() is None:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier() -> None:
    if launched() is not None and dist.is_initialized():
        dist.barrier()
