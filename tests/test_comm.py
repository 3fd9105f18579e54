"""icepop.comm on real gloo groups in spawned processes: weights streamed by broadcast arrive bit-exact
(every dtype and shape, several buckets, alignment), and every listening socket is on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import free_port, run_ranks

pytestmark = pytest.mark.slow  # gloo process groups in spawned processes


def buckets() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "a.weight": torch.randn(3, 5, generator=g),
            "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),  # 14 bytes: the next one is padded
            "c.count": torch.tensor(3, dtype=torch.int64),  # a 0-d tensor
        },
        {},  # skipped, not an end mark
        {"d.empty": torch.empty(0, 4), "e.half": torch.randn(2, 3, 3, generator=g).half()},
    ]


def listening_addresses() -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp") if c.status == "LISTEN"}


def _member(rank: int, world_size: int, port: int, out: str) -> None:
    from icepop import comm

    group = comm.weight_group("127.0.0.1", port, rank, world_size, torch.device("cpu"))
    if rank == 0:
        sent = comm.send_tensors(group, buckets(), torch.device("cpu"))
        torch.save({"sent": sent, "listen": listening_addresses()}, f"{out}/rank0.pt")
    else:
        received = {name: t.clone() for name, t in comm.receive_tensors(group, torch.device("cpu"))}
        torch.save({"received": received, "listen": listening_addresses()}, f"{out}/rank{rank}.pt")
    # A second round on the same group: the end mark left both sides in step.
    if rank == 0:
        comm.send_tensors(group, [{"x": torch.ones(2)}], torch.device("cpu"))
    else:
        assert [name for name, _ in comm.receive_tensors(group, torch.device("cpu"))] == ["x"]


def test_broadcast_streams_named_tensors_bit_exact_and_listens_on_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # inherited by the spawned members
    run_ranks(_member, 3, free_port(), str(tmp_path), error_dir=tmp_path / "errors", timeout_s=120)
    expected = {name: t for bucket in buckets() for name, t in bucket.items()}
    for rank in (1, 2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(got["received"]) == list(expected)
        for name, tensor in expected.items():
            assert got["received"][name].dtype == tensor.dtype and got["received"][name].shape == tensor.shape
            assert torch.equal(got["received"][name], tensor), name
        assert got["listen"] <= {"127.0.0.1"}, got["listen"]
    rank0 = torch.load(tmp_path / "rank0.pt")
    assert rank0["listen"] == {"127.0.0.1"}  # the store's server and gloo, never 0.0.0.0 or ::
    # 15·4 → 64, 7·2 → 16, 8 → 16; 0 → 0, 18·2 → 48 bytes (16-byte aligned)
    assert rank0["sent"] == 64 + 16 + 16 + 0 + 48


def _world(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from icepop import comm

    comm.init_world("127.0.0.1", port, rank, world_size, "gloo")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert float(t) == 3.0
    if rank == 0:
        torch.save(listening_addresses(), f"{out}/world.pt")
    dist.destroy_process_group()


def test_world_group_store_listens_on_the_given_address_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    run_ranks(_world, 2, free_port(), str(tmp_path), error_dir=tmp_path / "errors", timeout_s=120)
    assert torch.load(tmp_path / "world.pt") == {"127.0.0.1"}
