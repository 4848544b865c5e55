"""The test harness itself: a rendezvous port taken by another process between free_port() and rank
0's store listening on it (seen once under load: EADDRINUSE) starts the job again on another port."""

import socket

import pytest

from dist_llama import testing


def _rank_of_world():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rank


@pytest.mark.timeout(90)
def test_a_taken_rendezvous_port_is_replaced(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real = testing.free_port
        monkeypatch.setattr(testing, "free_port", lambda: ports.pop() if ports else real())
        assert testing.run_ranks(_rank_of_world, 2, timeout=80) == [0, 1]
        assert ports == []  # the taken port was handed out first


@pytest.mark.timeout(60)
def test_a_failing_rank_still_fails_the_job():
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        testing.run_ranks(_fail_on_rank_1, 2, timeout=50)


def _fail_on_rank_1():
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("boom")
    return 0
