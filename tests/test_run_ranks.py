"""The test harness itself: a rendezvous port taken by another process between free_port() and rank
0's store listening on it (seen once under load: EADDRINUSE) starts the job again on another port;
a process group left as uncollected garbage in the parent (an in-process test's) is not inherited into
ranks that would hang destroying it."""

import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

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


PARENT = textwrap.dedent("""
    import gc, sys
    import torch.distributed as dist
    from dist_llama.testing import run_ranks

    def collect():
        gc.collect()  # in a child that inherited the garbage group, this destroys it (without its threads)
        return "ok"

    gc.disable()  # nothing collects the cycle below in this process unless asked to
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    holder = {"group": dist.group.WORLD}
    holder["self"] = holder  # a reference cycle: only the collector frees the group and stops its threads
    if sys.argv[1] == "garbage":
        dist.destroy_process_group()
        del holder
    try:
        print(run_ranks(collect, 2, timeout=40))
    except RuntimeError as exc:
        print(exc)
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("state,expect", [
    ("garbage", "['ok', 'ok']"),  # old harness: both ranks wait forever in ~ProcessGroupGloo's pthread_join
    ("alive", "this process still runs a gloo process group"),
])
def test_ranks_are_forked_from_a_parent_without_a_process_group(state, expect):
    proc = subprocess.run([sys.executable, "-c", PARENT, state], cwd=ROOT, capture_output=True, text=True,
                          timeout=100)
    assert expect in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
