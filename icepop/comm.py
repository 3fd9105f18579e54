"""torch.distributed groups that listen only where they are told, and weights streamed by broadcast.

Two groups use this: the trainer ranks' world group (DeepSpeed runs on it), and the weight group of
trainer rank 0 and every rollout engine, over which the new weights travel after each update (gloo on
CPU, NCCL on GPU; across nodes as well as within one).

Key design choices:
- torch's TCPStore binds its port on every interface. We open the listening socket ourselves on the
  given address and hand it over (`master_listen_fd`), so a local run listens on 127.0.0.1 only.
- The weight group is a standalone process group, not a second default group: the trainer's DeepSpeed
  world and vLLM's own group inside the engine process are untouched.
- Weights stream in buckets that describe themselves (a JSON header of names, dtypes and shapes, then
  one flat byte buffer), so the receiver needs no prior knowledge of the model and holds one bucket at
  a time, never a second copy of the model.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT = timedelta(minutes=10)
ALIGN_BYTES = 16  # every tensor starts at a multiple of this in the flat buffer (dtype views need it)


def tcp_store(addr: str, port: int, world_size: int, is_master: bool) -> dist.TCPStore:
    """The rendezvous store; on the master, its server listens on `addr` alone."""
    extra = {}
    if is_master:
        # socket.create_server sets SO_REUSEADDR; the store takes ownership of the detached descriptor.
        extra["master_listen_fd"] = socket.create_server((addr, port), backlog=128).detach()
    return dist.TCPStore(addr, port, world_size, is_master, TIMEOUT, wait_for_workers=False, **extra)


def init_world(addr: str, port: int, rank: int, world_size: int, backend: str) -> None:
    """Initialise the default process group (rank 0 hosts the store on addr:port)."""
    store = tcp_store(addr, port, world_size, is_master=rank == 0)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)


def weight_group(addr: str, port: int, rank: int, world_size: int, device: torch.device) -> dist.ProcessGroup:
    """A standalone group for weight broadcasts from rank 0: NCCL for CUDA tensors, gloo otherwise.

    Collective: every member calls it at the same time. Gloo binds the interface named by
    GLOO_SOCKET_IFNAME (icepop sets `lo` for a local cluster), else the host name's address.
    """
    store = tcp_store(addr, port, world_size, is_master=rank == 0)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)


def _broadcast(group: dist.ProcessGroup, tensor: Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def send_tensors(group: dist.ProcessGroup, buckets: Iterable[dict[str, Tensor]], device: torch.device) -> int:
    """Broadcast named tensors from rank 0, bucket by bucket, then an end mark; returns bytes sent.

    Every other member must be consuming `receive_tensors` at the same time.
    """
    sent = 0
    for bucket in buckets:
        if not bucket:
            continue
        entries = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in bucket.items()]
        header = torch.frombuffer(bytearray(json.dumps(entries).encode()), dtype=torch.uint8)
        chunks = []
        for tensor in bucket.values():
            raw = tensor.detach().contiguous().view(-1).view(torch.uint8).to(device)
            padding = _aligned(raw.numel()) - raw.numel()
            chunks += [raw, torch.zeros(padding, dtype=torch.uint8, device=device)]
        payload = torch.cat(chunks)
        _broadcast(group, torch.tensor([header.numel()], dtype=torch.int64, device=device))
        _broadcast(group, header.to(device))
        _broadcast(group, payload)
        sent += payload.numel()
    _broadcast(group, torch.zeros(1, dtype=torch.int64, device=device))  # end mark: an empty header
    return sent


def receive_tensors(group: dist.ProcessGroup, device: torch.device) -> Iterator[tuple[str, Tensor]]:
    """The named tensors rank 0 sends with `send_tensors`, as views into each bucket's buffer.

    Consume it to the end (until the end mark), even after an error: a member that stops early leaves
    the sender blocked in its next broadcast.
    """
    while True:
        size = torch.zeros(1, dtype=torch.int64, device=device)
        _broadcast(group, size)
        if int(size) == 0:
            return
        header = torch.empty(int(size), dtype=torch.uint8, device=device)
        _broadcast(group, header)
        entries = json.loads(bytes(header.tolist()))
        layout = [(name, getattr(torch, dtype), shape) for name, dtype, shape in entries]
        nbytes = [torch.Size(shape).numel() * dtype.itemsize for _, dtype, shape in layout]
        payload = torch.empty(sum(_aligned(n) for n in nbytes), dtype=torch.uint8, device=device)
        _broadcast(group, payload)
        offset = 0
        for (name, dtype, shape), n in zip(layout, nbytes, strict=True):
            yield name, payload[offset : offset + n].view(dtype).view(shape)
            offset += _aligned(n)
