"""Shares of the work and start-up work run once: the helpers every dataset-scale command uses."""

from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp

from weakclip.distributed import DistInfo, Shard, available_cores, init_distributed, launch_share, run_once
from weakclip.errors import WeakclipError


def test_shards_are_disjoint_and_cover_the_list():
    items = [f"id{i}" for i in range(11)]
    for count in (1, 2, 3, 5, 11, 12):
        shares = [Shard(i, count).take(items) for i in range(count)]
        flat = [x for share in shares for x in share]
        assert sorted(flat) == sorted(items) and len(flat) == len(items)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    assert Shard(1, 3).take(items) == ["id1", "id4", "id7", "id10"]  # strided, in list order


def test_shard_parsing_gives_one_line_errors():
    assert Shard.parse("1/4") == Shard(1, 4) and str(Shard.parse(" 0/2")) == "0/2"
    for bad in ("4/4", "1", "a/2", "-1/2", "1/0", "1/2/3"):
        with pytest.raises(WeakclipError, match=r"^--shard"):
            Shard.parse(bad)


def test_cores_are_shared_by_the_processes_of_a_machine(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = available_cores()
    assert alone == len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * alone))
    assert available_cores() == 1  # never zero


def test_run_once_in_one_process_runs_it_and_raises_as_is():
    info = DistInfo(0, 1, 0, None)
    calls = []
    assert run_once(lambda: calls.append(1) or "listed", info) == "listed" and calls == [1]
    assert launch_share(info) == Shard(0, 1)

    def bad():
        raise WeakclipError("x.json: broken")

    with pytest.raises(WeakclipError, match="x.json: broken"):
        run_once(bad, info)


def _rank_main(rank: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = init_distributed()
    seen = []
    value = run_once(lambda: seen.append(rank) or {"samples": [1, 2, 3]}, info)
    try:
        run_once(lambda: (_ for _ in ()).throw(WeakclipError("labels.json: id 7 missing")), info)
        error = None
    except WeakclipError as exc:
        error = str(exc)
    queue.put((rank, value, seen, error, launch_share(info).take(list(range(5)))))


def test_run_once_under_two_gloo_processes_shares_the_result_and_the_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_rank_main, args=(port, queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get(timeout=60) for _ in range(2))
    assert results[0] == (0, {"samples": [1, 2, 3]}, [0], "labels.json: id 7 missing", [0, 2, 4])
    assert results[1] == (1, {"samples": [1, 2, 3]}, [], "labels.json: id 7 missing", [1, 3])
