"""Several processes on one calibration set (`torchrun --nproc-per-node N -m ckptinit ...`).

Every rank takes every N-th batch of the same seeded batch sequence: rank r owns batches
r, r + N, ... (`shard`), so the shards together are exactly the batches of one process.
It decodes only the images it uses (data/read.py: those of its batches and gradient draws,
`draw_batches`; the first images and the hold-out ones, which every rank uses). The
statistics are sums and are all-reduced (`all_reduce_sum_`) before anything is derived
from them; every rank then computes the same weights, and rank 0 writes the outputs. The
within-layer step rewrites units batch after batch, so its batches are relayed (`Relay`):
each rank sends the moments it measured on a unit to the others, which replay them in
batch order before the unit's next forward. The result equals one process up to the order
of float summation.

Backends: gloo for the CPU, NCCL for CUDA (one GPU per rank, from LOCAL_RANK). A rank that
fails exits; with gloo the others see their connection close at once, stop without a
message of their own (`PeerLost`: the failing rank says why) and torchrun ends the rest; a
rank that hangs stops the others after TIMEOUT_SECONDS. Nothing here is active unless
`from_env` found a torchrun environment (WORLD_SIZE > 1): one process is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import CkptInitError, UsageError

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 600  # a rank that waits this long for another one stops


class PeerLost(CkptInitError):
    """Another rank stopped (its connection closed); that rank's own message says why."""

    silent = True  # the CLI prints nothing for it: one failure, one message


class PeerTimeout(CkptInitError):
    """Another rank did not answer within TIMEOUT_SECONDS (it hung, or is far behind)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of a run (rank 0 of 1 alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that reports and writes."""
        return self.rank == 0

    def owns(self, batch: int) -> bool:
        return batch % self.world == self.rank

    def owner(self, batch: int) -> int:
        return batch % self.world


_current = Ranks()
_created = False  # whether from_env created the process group (then shutdown destroys it)
_device = torch.device("cpu")  # where the collectives' own tensors live (NCCL: the GPU)


def current() -> Ranks:
    """The ranks of the run in progress (rank 0 of 1 outside `from_env`)."""
    return _current


def collective_device() -> torch.device:
    """Where tensors given to the collectives must be (NCCL: this rank's GPU; else the CPU)."""
    return _device


def env_ranks() -> Ranks:
    """RANK and WORLD_SIZE as torchrun sets them (rank 0 of 1 when unset); no torch call."""
    try:
        return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return Ranks()


def from_env(device_option: str) -> Ranks:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on the CPU, NCCL on CUDA,
    this rank's GPU from LOCAL_RANK; `device_option` as --device gives it); the ranks
    become `current()` until `shutdown`. Alone, nothing happens (not even the device check)."""
    global _current, _created, _device
    ranks = env_ranks()
    if ranks.world <= 1:
        return _current
    from .device import resolve_device

    device = resolve_device(device_option)
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"Several processes run on cpu or cuda, not {device.type}; pass "
                         "--device cpu or cuda.")
    if device.type == "cuda":
        if device.index is not None:
            raise UsageError(f"--device {device} names one GPU, but under torchrun each rank "
                             "uses the GPU of its LOCAL_RANK; pass --device cuda (or auto).")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} "
                             "here); start at most one process per GPU.")
        torch.cuda.set_device(local)
        _device = torch.device("cuda", local)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        with _translated():
            dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_SECONDS))
        _created = True
    _current = Ranks(dist.get_rank(), dist.get_world_size())
    log.info("rank %d of %d (%s)", _current.rank, _current.world, dist.get_backend())
    return _current


def shutdown() -> None:
    """Leave the process group `from_env` joined (destroyed only if it created it)."""
    global _current, _created, _device
    if _created and dist.is_initialized():
        dist.destroy_process_group()
    _current, _created, _device = Ranks(), False, torch.device("cpu")


@contextlib.contextmanager
def together() -> Iterator[None]:
    """A stage that every rank runs through: when it fails on any rank, every rank stops
    there; the lowest failing rank raises its error, the others `PeerLost` (no message), so
    that a failure every rank meets (a missing folder) is reported once. Only for stages
    with no collective inside, which a failing rank would leave the others waiting in,
    or whose collectives are each preceded by a `together` of their own (the data stage):
    a `PeerLost` from such an inner one counts as no failure of this rank, so the rank
    that failed is still the one that reports."""
    if _current.world == 1:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # Ctrl-C and SIGTERM leave at once
        error = e
    failed = torch.zeros(_current.world, dtype=torch.float64, device=_device)
    failed[_current.rank] = float(error is not None and not isinstance(error, PeerLost))
    all_reduce_sum_([failed])
    ranks = failed.nonzero().flatten().tolist()
    if error is not None and (not ranks or ranks[0] == _current.rank):
        raise error
    if ranks:
        raise PeerLost(f"rank {ranks[0]} failed.") from error


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """torch.distributed failures as typed one-line errors."""
    try:
        yield
    except RuntimeError as e:  # gloo and NCCL raise RuntimeError subclasses (DistError)
        text = " ".join(str(e).split())
        low = text.lower()
        if "timed out" in low or "timeout" in low:
            raise PeerTimeout(f"another rank did not answer within {TIMEOUT_SECONDS} s (it "
                              "hung or stopped); stopping.") from e
        if "closed" in low or "reset" in low or "broken pipe" in low or "abort" in low:
            raise PeerLost("another rank stopped.") from e
        raise


def _wait(work) -> None:
    """Wait for a collective from Python, a little at a time: a wait inside torch would hold
    off Ctrl-C and torchrun's SIGTERM until it returned (up to TIMEOUT_SECONDS). (Gloo's
    point-to-point operations complete only inside their wait: the relay blocks; the rank it
    waits for is not blocked, so a signal ends that one and its closed connection the wait.)"""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    pause = 1e-5
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise PeerTimeout(f"another rank did not answer within {TIMEOUT_SECONDS} s (it "
                              "hung or stopped); stopping.")
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)
    work.wait()  # raises the operation's own failure, if any


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one collective per dtype); nothing alone."""
    if _current.world == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        with _translated():
            _wait(dist.all_reduce(flat, async_op=True))
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def same_as_main(digest: bytes) -> bool:
    """Whether rank 0 holds the same digest (True alone)."""
    if _current.world == 1:
        return True
    mine = torch.tensor(list(digest), dtype=torch.int64, device=_device)
    main = mine.clone()
    with _translated():
        _wait(dist.broadcast(main, 0, async_op=True))
    return bool(torch.equal(mine, main))


def from_main(value: float) -> float:
    """Rank 0's value of a number every rank computed (the one it reports and acts on)."""
    if _current.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device)
    with _translated():
        _wait(dist.broadcast(t, 0, async_op=True))
    return float(t)


def shard(batches) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, batch) for the batches this rank owns, read without the others; every batch
    alone."""
    if _current.world == 1:
        yield from enumerate(batches)
        return
    owned = range(_current.rank, len(batches), _current.world)
    select = getattr(batches, "select", None)
    if callable(select):
        yield from zip(owned, select(owned))
    else:
        for i in owned:
            yield i, batches[i]


def draw_batches(draws: int, num_batches: int) -> dict[int, int]:
    """The gradient draws this rank makes (draw j: rank j % N), each with the batch it
    uses (j modulo the batches used): `rates.estimate_rates` reads them, and the data
    stage reads their images on this rank."""
    used = max(1, min(draws, num_batches))
    return {j: j % used for j in range(draws) if j % _current.world == _current.rank}


def reduce_batchnorm_(bns: Iterable[torch.nn.Module]) -> None:
    """Cumulative running statistics (momentum None) over every rank's batches: the means
    weighted by each rank's batch count, as one process would have averaged them."""
    bns = [m for m in bns if m.track_running_stats and m.running_mean is not None]
    if _current.world == 1 or not bns:
        return
    parts = []
    for m in bns:
        n = m.num_batches_tracked.double()
        parts += [m.running_mean.double() * n, m.running_var.double() * n, n.reshape(1)]
    all_reduce_sum_(parts)
    for i, m in enumerate(bns):
        mean, var, n = parts[3 * i : 3 * i + 3]
        total = n.clamp_min(1)
        m.running_mean.copy_(mean / total)
        m.running_var.copy_(var / total)
        m.num_batches_tracked.copy_(n.reshape(()).long())


class Relay:
    """Point-to-point messages of one unit and one batch, from the batch's owner to every
    other rank, received in the order they were sent (per unit, batch by batch).

    Sends do not wait; `flush` waits until every message sent has been delivered.
    """

    def __init__(self, ranks: Ranks, device: torch.device) -> None:
        self.ranks = ranks
        self.device = device
        self._pending: list[tuple[object, torch.Tensor]] = []

    def send(self, tag: int, tensor: torch.Tensor) -> None:
        # a copy (the caller may change it before it is delivered), contiguous as gloo
        # needs (a channels-last weight: ckptinit.layout)
        data = tensor.detach().clone(memory_format=torch.contiguous_format)
        with _translated():
            for dst in range(self.ranks.world):
                if dst != self.ranks.rank:
                    self._pending.append((dist.isend(data, dst, tag=tag), data))

    def receive(self, tag: int, src: int, like: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(like, device=self.device, memory_format=torch.contiguous_format)
        with _translated():
            dist.irecv(out, src, tag=tag).wait()
        return out

    def flush(self) -> None:
        with _translated():
            for work, _ in self._pending:
                work.wait()
        self._pending.clear()
