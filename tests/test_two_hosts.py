"""One stage trained across two hosts, as docs/production.md ("One stage across several
nodes, without ssh") tells a user to set it up: a hostfile listing both, storage both see
(here the same file system), and on each host DeepSpeed's multi-node launcher in its
no-ssh mode, ``python -m rlhf_tasks.pipeline.launch sft --output RUN --node-rank I
--master-addr ADDR``, with ``GLOO_SOCKET_IFNAME`` naming the interface the hosts reach
each other on.

The two hosts are network namespaces of this machine joined by a veth pair, each with an
address of its own: the ranks meet only over that link, through gloo's TCP transport, as
on two machines (one CPU rank per host, SFT at ZeRO-3: every forward pass a collective
between the hosts). Making namespaces needs root (CAP_NET_ADMIN) and ``ip``: without them
the test is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from rlhf_tasks.config import PipelineConfig
from rlhf_tasks.pipeline.launch import free_port
from rlhf_tasks.storage import RunDir
from tests.ranks import BASE, REPO, STEPS, launcher_env

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Host:
    namespace: str
    interface: str
    address: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Namespaces a and b, veth a <-> b, addresses 10.77.N.1 and 10.77.N.2 (N from the pid,
    so that two test sessions do not share a subnet); removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces cannot be made here: no `ip` command (iproute2)")
    tag, subnet = f"{os.getpid() % 100000}", f"10.77.{os.getpid() % 250 + 1}"
    hosts = (Host(f"rlhf-{tag}-a", f"rv{tag}a", f"{subnet}.1"), Host(f"rlhf-{tag}-b", f"rv{tag}b", f"{subnet}.2"))
    try:
        _ip("netns", "add", hosts[0].namespace)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"network namespaces cannot be made here (`ip netns add` needs root with CAP_NET_ADMIN and "
                    f"CAP_SYS_ADMIN): {e.stderr.strip()}")
    try:
        _ip("netns", "add", hosts[1].namespace)
        _ip("link", "add", hosts[0].interface, "type", "veth", "peer", "name", hosts[1].interface)
        for h in hosts:
            _ip("link", "set", h.interface, "netns", h.namespace)
            _ip("-n", h.namespace, "addr", "add", f"{h.address}/24", "dev", h.interface)
            _ip("-n", h.namespace, "link", "set", h.interface, "up")
            _ip("-n", h.namespace, "link", "set", "lo", "up")
        yield hosts
    finally:
        for h in hosts:  # deleting a namespace deletes its end of the veth pair, and so both
            subprocess.run(["ip", "netns", "del", h.namespace], capture_output=True, timeout=30)


def test_one_stage_across_two_hosts(two_hosts, storage, tiny_model_dir, tmp_path):
    a, b = two_hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the nodes of the stage, node 0 first\nhost-a slots=1\nhost-b slots=1\n")
    run = RunDir(tmp_path / "run")
    PipelineConfig.load("tiny-cpu", [*BASE, "resources.cpu_processes=1", "resources.num_nodes=2",
                                     f"resources.hostfile={hostfile}", "sft.zero_stage=3"]).save(run.config_path)
    port = str(free_port())
    t0 = time.monotonic()
    procs = [subprocess.Popen(["ip", "netns", "exec", h.namespace, sys.executable, "-u", "-m",
                               "rlhf_tasks.pipeline.launch", "sft", "--output", str(run.path), "--node-rank", str(i),
                               "--master-addr", a.address, "--master-port", port],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                              env=launcher_env(GLOO_SOCKET_IFNAME=h.interface))
             for i, h in enumerate((a, b))]
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - t0
    print(f"TWO-HOSTS sft across 2 namespaces (1 CPU rank each, ZeRO-3, {STEPS} steps): {elapsed:.0f} s")
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-5000:]
    assert f"--no_ssh --node_rank 0 --master_addr {a.address}" in outs[0]
    assert "world_size=2 rank=0" in outs[0] and "world_size=2 rank=1" in outs[1]
    results = [ln for out in outs for ln in out.splitlines() if ln.startswith("RLHF_RESULT ")]
    assert len(results) == 1 and results[0] in outs[0]  # rank 0, on node 0, reports
    metrics = json.loads(results[0].removeprefix("RLHF_RESULT "))["metrics"]
    assert metrics["global_step"] == STEPS and metrics["perplexity"] < metrics["perplexity_before"]
    assert (run.final("sft") / "model.safetensors").is_file()
