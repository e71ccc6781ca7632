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

The environment is checked before anything runs (``launched``): ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``
whole numbers with ``RANK < WORLD_SIZE``, ``MASTER_ADDR`` set and ``MASTER_PORT`` a port. Start-up
(``setup``) waits at most ``PROMPTVIT_DIST_TIMEOUT`` seconds (default 300) for every rank to join and
then names the ranks that did not, instead of waiting for ever for a process that was never started.

The split is exact when the training set size is a multiple of the global batch and the global batch a
multiple of N; otherwise the last batch is padded by repeating some of its items.
Batch-dependent state (BatchNorm statistics of methods that train the backbone) is per rank.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Iterable, Iterator

import torch
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset

from promptvit.errors import ConfigError
from promptvit.validation import env_int, env_seconds

logger = logging.getLogger(__name__)

#: seconds start-up waits for every rank to join (``PROMPTVIT_DIST_TIMEOUT`` overrides)
DEFAULT_JOIN_TIMEOUT = 300.0
_TORCHRUN = "start the processes with torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int


def launched() -> Ranks | None:
    """The process's place when started by torchrun with more than one process, else None.

    ``ConfigError`` naming the variable when the environment is not a valid launch (``WORLD_SIZE=abc``,
    ``WORLD_SIZE=2`` without ``RANK``, ``RANK=5`` of 2, no ``MASTER_ADDR``...).
    """
    world = env_int("WORLD_SIZE", default=1, minimum=1, hint=f"unset it for one process, or {_TORCHRUN}")
    if world == 1:
        return None
    rank = env_int("RANK", minimum=0, maximum=world - 1, hint=f"WORLD_SIZE={world} needs RANK 0..{world - 1}")
    if rank is None:
        raise ConfigError(f"WORLD_SIZE={world} but RANK is not set; {_TORCHRUN}, or unset WORLD_SIZE")
    local_world = env_int("LOCAL_WORLD_SIZE", default=world, minimum=1, maximum=world, hint=_TORCHRUN)
    local_rank = env_int("LOCAL_RANK", default=0, minimum=0, maximum=local_world - 1, hint=_TORCHRUN)
    if not os.environ.get("MASTER_ADDR", "").strip():
        raise ConfigError(f"WORLD_SIZE={world} but MASTER_ADDR is not set (the address of rank 0); {_TORCHRUN}")
    port = env_int("MASTER_PORT", minimum=1, maximum=65535, hint="give the free TCP port rank 0 listens on")
    if port is None:
        raise ConfigError(f"WORLD_SIZE={world} but MASTER_PORT is not set (the port of rank 0); {_TORCHRUN}")
    env_seconds("PROMPTVIT_DIST_TIMEOUT", DEFAULT_JOIN_TIMEOUT)
    return Ranks(rank, world, local_rank)


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
        if ranks.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={ranks.local_rank} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        store = _join(ranks, env_seconds("PROMPTVIT_DIST_TIMEOUT", DEFAULT_JOIN_TIMEOUT))
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=store, rank=ranks.rank, world_size=ranks.world_size
        )
    if ranks.rank != 0:  # one copy of the per-epoch lines, from rank 0
        logging.getLogger("promptvit").setLevel(logging.WARNING)
    return ranks, device


def _join(ranks: Ranks, timeout: float) -> dist.Store:
    """The rendezvous store, once every rank has joined; ``ConfigError`` naming the missing ranks after
    ``timeout`` seconds (torch's own rendezvous would wait, silently, for 30 minutes or more).

    Rank 0 hosts the store at ``MASTER_ADDR:MASTER_PORT``, unless torchrun's agent already does.
    """
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    where = f"{address}:{port}"
    fix = "start the missing processes, or raise PROMPTVIT_DIST_TIMEOUT (seconds) if they start late"
    try:
        server = dist.TCPStore(
            address,
            port,
            is_master=ranks.rank == 0 and not hosted_by_agent,
            timeout=datetime.timedelta(seconds=timeout),
            wait_for_workers=False,
            multi_tenant=True,
        )
    except (RuntimeError, OSError) as error:  # DistNetworkError: rank 0 unreachable, or the port taken
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if ranks.rank == 0 and not hosted_by_agent:
            raise ConfigError(
                f"rank 0 cannot listen on MASTER_PORT {where} ({first}); choose a free port"
            ) from None
        raise ConfigError(
            f"rank {ranks.rank} of {ranks.world_size} could not reach rank 0 at {where} within {timeout:g} s "
            f"({first}); {fix}, and check MASTER_ADDR and MASTER_PORT"
        ) from None
    # keys of an earlier attempt under torchrun's restarts must not count as joined
    store = dist.PrefixStore(f"promptvit/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", server)
    store.set(f"joined/{ranks.rank}", "1")
    started = time.monotonic()
    missing = list(range(ranks.world_size))
    announced = False
    while True:
        missing = [r for r in missing if not store.check([f"joined/{r}"])]
        if not missing:
            return store
        if time.monotonic() > started + timeout:
            named = ", ".join(map(str, missing))
            raise ConfigError(
                f"rank {ranks.rank}: rank(s) {named} of {ranks.world_size} did not join at {where} within "
                f"{timeout:g} s; {fix}"
            )
        if not announced and ranks.rank == 0 and time.monotonic() > started + min(5.0, timeout / 2):
            logger.info(
                "waiting up to %g s for rank(s) %s of %d at %s (PROMPTVIT_DIST_TIMEOUT)",
                timeout,
                ", ".join(map(str, missing)),
                ranks.world_size,
                where,
            )
            announced = True
        time.sleep(0.1)


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
