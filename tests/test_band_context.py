"""The band context's exchange buffers, on two real gloo processes (no model, no GPU)."""

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stadi_core.parallel.context import BandContext, Phase

ROWS = [3, 5]  # unequal bands: the smaller one is padded on the wire


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _band(rank: int, step: int) -> torch.Tensor:
    """A band's fresh tensor at one step: values that name the rank, the step and the row."""
    rows = ROWS[rank]
    return (1000.0 * rank + 10.0 * step + torch.arange(rows, dtype=torch.float32)).reshape(1, rows, 1).expand(1, rows, 4).contiguous()


def _displaced_rounds(rank: int, port: int, queue) -> None:
    """Two REFRESH rounds after a FRESH one; after each launch the fresh tensor is overwritten
    in place, as the next CUDA-graph replay overwrites its static activations."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        ctx = BandContext(ROWS, rank, dist.group.WORLD, timeout_s=30)
        ctx.begin_call(Phase.FRESH)
        ctx.exchange(7, _band(rank, 0), 1, ROWS)
        ctx.end_call()
        seen, addresses = [], []
        for step in (1, 2):
            ctx.begin_call(Phase.REFRESH)  # completes the previous round's exchange first
            if step == 2:
                seen.append([t.clone() for t in ctx._buffers[(0, 7, 0)]])
            local = _band(rank, step)
            ctx.exchange(7, local, 1, ROWS)
            ctx.end_call()  # starts the asynchronous all-gather
            local.fill_(float("nan"))  # the "next replay" writes into the tensor that was sent
            wire = ctx._wires[(0, 7, 0)]
            addresses.append((wire.send.data_ptr(), tuple(t.data_ptr() for t in wire.recv)))
        ctx.begin_call(Phase.REFRESH)
        seen.append([t.clone() for t in ctx._buffers[(0, 7, 0)]])
        ctx.end_call()
        # numpy, not tensors: a tensor in a multiprocessing queue is shared by a file descriptor that
        # the parent fetches from this process, which may have exited by then
        queue.put((rank, [[t.numpy() for t in row] for row in seen], addresses, None))
    except BaseException as exc:  # report instead of hanging the parent
        queue.put((rank, None, None, repr(exc)))
    finally:
        dist.destroy_process_group()


def test_async_exchange_sends_a_snapshot_through_buffers_allocated_once():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_displaced_rounds, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            rank, seen, addresses, error = queue.get(timeout=60)
            assert error is None, f"rank {rank}: {error}"
            results[rank] = (seen, addresses)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, (seen, addresses) in results.items():
        for round_index, step in enumerate((1, 2)):
            for other in range(2):
                got = torch.from_numpy(seen[round_index][other])
                assert torch.isfinite(got).all(), f"rank {rank} stored a band overwritten after its send"
                if other != rank:
                    assert torch.equal(got, _band(other, step)), (rank, step, other)
        assert addresses[0] == addresses[1], "the all-gather buffers were re-allocated between steps"


def test_a_new_plan_gets_new_wire_buffers():
    ctx = BandContext([4, 4], 0)
    ctx._wire((1, 0), torch.zeros(1, 4, 2), 1, 4)
    ctx.reset([4, 4])
    assert (1, 0) in ctx._wires  # same plan: kept (addresses stay valid for captured graphs)
    ctx.reset([2, 6])
    assert not ctx._wires
