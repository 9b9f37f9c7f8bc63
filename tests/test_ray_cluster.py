"""The README's two-node cluster, on this machine: ``ray start`` twice, then the same driver.

The module starts a Ray cluster of two nodes of one CPU each with the
README's commands (``ray start --head --port=P --ray-client-server-port=Q
--num-cpus=1``, then ``ray start --address=127.0.0.1:P --num-cpus=1``), every
server bound to 127.0.0.1, in a temporary directory of its own, with token
authentication on. Each test runs a driver program
(``ray_cluster_workers.main``, the README's ``crawl.py``) in a process of its
own, joining the cluster one of the README's ways: a pool of two actors of one
CPU each must use both nodes.

What one machine changes (see "A two-node cluster" in the README):

* Binding 127.0.0.1 only takes ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in
  every Ray process's environment: otherwise Ray replaces
  ``--node-ip-address=127.0.0.1`` with the machine's outward address (it
  keeps 127.0.0.1 only where clusters are off by default, Windows and macOS),
  and its servers listen on every interface. With that setting, though, the
  second ``ray start --address=...`` refuses to start ("Multi-node Ray
  clusters are not supported on Windows and OSX"). The module runs it, and
  when it refuses so, runs the same command through Ray's own CLI code with
  that one check lifted (``LIFT_GUARD``): the same node as ``ray start``
  starts, a raylet with its agents, sharing the head's temporary directory as
  two raylets on one host do in Ray's own ``ray.cluster_utils.Cluster``.
* ``ray stop --force`` kills every Ray process of the machine, including a
  local instance tests/test_ray.py may be running in the same pytest process
  (or anyone else's); the module's clean-up does the same (SIGKILL) to its own
  cluster only: the processes whose command line names its temporary
  directory or its GCS port, and their descendants, and waits for them with
  ``psutil.wait_procs``.

Not about one machine: the head's Ray Client server runs with
``GRPC_ENABLE_FORK_SUPPORT=0`` (see the ``cluster`` fixture), or one ``ray://``
connection in about twenty fails (ray-project/ray#63202).

Ray is never imported in the pytest process. Skipped when Ray is not
installed; ``nox -s ray`` runs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

if importlib.util.find_spec("ray") is None:
    pytest.skip("needs Ray: pip install 'looppool[ray]' (nox -s ray)", allow_module_level=True)

import ray_cluster_workers as w

TESTS = Path(__file__).parent
RAY = Path(sys.executable).with_name("ray")  # the `ray` command of this environment
START_DEADLINE = 60.0  # seconds a `ray start` may take (about 4 s here)
DRIVER_DEADLINE = 90.0  # seconds a driver may take (about 3 s here)
EXIT_DEADLINE = 10.0  # seconds the cluster's processes get to disappear
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # near Ray's minimum: the tests move small values
GUARD_MESSAGE = "Multi-node Ray clusters are not supported on Windows and OSX"

# `ray start`, with its refusal to start a second node when clusters are off
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) lifted: `ray start` reads the setting
# twice, to keep 127.0.0.1 as the node's address and in that check; only the
# check sees it turned on.
LIFT_GUARD = """
import sys, types
import ray._private.ray_constants as constants
import ray.scripts.scripts as scripts
shim = types.ModuleType(constants.__name__)
shim.__dict__.update(vars(constants))
shim.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = shim
sys.argv[0] = "ray"
scripts.main()
"""

DRIVER = "import ray_cluster_workers as w; w.main()"


@dataclass
class Cluster:
    """The module's cluster: where it lives, and the environment its processes share."""

    temp_dir: str  # `ray start --temp-dir`: {RAY_TMPDIR}/ray, Ray's default place under RAY_TMPDIR
    port: int  # the head's GCS port, P
    client_port: int  # the head's Ray Client port, Q
    env: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _environment(token: str, tmpdir: str) -> dict[str, str]:
    """This process's environment without Ray's settings, plus the cluster's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        # Where Ray looks for "the cluster last started with `ray start` on
        # this machine" (RAY_TMPDIR/ray/ray_current_cluster, which `ray start`
        # writes in its --temp-dir): this cluster, not /tmp/ray's.
        RAY_TMPDIR=tmpdir,
        # 127.0.0.1 stays 127.0.0.1, and Ray's servers listen on it only.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # Every node and every driver: token authentication, with the
        # cluster's token (RAY_AUTH_TOKEN comes before ~/.ray/auth_token).
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        # The nodes import the worker module as a user's nodes import theirs.
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    )
    return env


def _run(argv: list[str], env: dict[str, str], deadline: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=deadline)


def _node_options(cluster: Cluster) -> list[str]:
    """The options both `ray start` commands add to the README's: one machine, loopback only."""
    return [
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={cluster.temp_dir}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        # Workers' ports from the OS, not from Ray's fixed range that other
        # Ray instances on this machine use too.
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]


def _cluster_processes(cluster: Cluster) -> list[psutil.Process]:
    """The cluster's processes: those naming its directory or GCS port, and their descendants."""
    port = re.compile(rf"127\.0\.0\.1:{cluster.port}\b")
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if proc.pid != os.getpid() and (cluster.temp_dir in cmdline or port.search(cmdline)):
            found[proc.pid] = proc
    for proc in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update((child.pid, child) for child in proc.children(recursive=True))
    return list(found.values())


def _stop(cluster: Cluster) -> list[psutil.Process]:
    """`ray stop --force`, for this cluster only: SIGKILL, then wait; return the survivors."""
    procs = _cluster_processes(cluster)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(procs, timeout=EXIT_DEADLINE)
    # Ray's daemons are not our children: their parent reaps them.
    return [p for p in alive if _status(p) not in (None, psutil.STATUS_ZOMBIE)]


def _status(proc: psutil.Process) -> str | None:
    try:
        return str(proc.status())
    except psutil.Error:
        return None


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two nodes of one CPU each, started with `ray start`; stopped (killed) at the end."""
    tmpdir = tempfile.mkdtemp(prefix="lprc-")  # short: Unix socket paths have a limit
    port, client_port = _free_ports(2)
    env = _environment(secrets.token_hex(32), tmpdir)
    cluster = Cluster(os.path.join(tmpdir, "ray"), port, client_port, env)
    try:
        head = [
            str(RAY),
            "start",
            "--head",
            f"--port={port}",
            f"--ray-client-server-port={client_port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
            *_node_options(cluster),
        ]
        # The head's Ray Client server forks a server per driver while its
        # gRPC threads run; now and then (3 in 70 connections here) the child
        # aborts in gRPC's fork handler, and the driver fails with "Starting
        # Ray client server failed" (ray-project/ray#63202). gRPC's remedy for
        # a process that always execs after fork: no fork handlers (80 in 80).
        head_env = cluster.env | {"GRPC_ENABLE_FORK_SUPPORT": "0"}
        started = _run(head, head_env, START_DEADLINE)
        assert started.returncode == 0, started.stdout + started.stderr
        second = ["start", f"--address={cluster.address}", "--num-cpus=1", *_node_options(cluster)]
        refused = _run([str(RAY), *second], cluster.env, START_DEADLINE)
        if refused.returncode != 0:
            # A loopback-only second node on one machine: see the docstring.
            assert GUARD_MESSAGE in refused.stdout + refused.stderr, refused.stderr
            started = _run([sys.executable, "-c", LIFT_GUARD, *second], cluster.env, START_DEADLINE)
            assert started.returncode == 0, started.stdout + started.stderr
        yield cluster
    finally:
        survivors = _stop(cluster)
        shutil.rmtree(tmpdir, ignore_errors=True)
        assert not survivors, f"the cluster's processes survived SIGKILL: {survivors}"


def drive(
    cluster: Cluster, address: str, *, kill: bool = False, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run the driver program against ``address`` (as RayPool's ``address=``); return its report."""
    argv = [sys.executable, "-c", DRIVER, address, *(["--kill"] if kill else [])]
    done = _run(argv, cluster.env | dict(env or {}), DRIVER_DEADLINE)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert reports, done.stdout[-3000:] + done.stderr[-5000:]
    report: dict[str, Any] = json.loads(reports[-1].removeprefix("REPORT "))
    return report


def check_spread_and_results(report: dict[str, Any]) -> None:
    """Both actors ran, each on a node of its own, and every message ran once where it was dealt."""
    where = report["where"]
    nodes = [worker["node"] for worker in where]
    assert [worker["number"] for worker in where] == [0, 1]
    assert len(set(nodes)) == 2, where
    assert sorted(nodes) == report["alive_nodes"]  # the cluster's two nodes, one actor each
    done = [r for r in report["results"] if r[0] == "done" and r[4][0] == "msg"]
    assert sorted(r[4][1] for r in done) == list(range(w.MESSAGES))
    assert Counter(r[1] for r in done) == {0: w.MESSAGES // 2, 1: w.MESSAGES // 2}
    assert all(r[2] == nodes[r[1]] for r in done)
    assert report["stats"]["failed"] == 0


def check_kill(report: dict[str, Any]) -> None:
    """Actor 0, killed holding two messages: both ran again, once; its replacement took its CPU."""
    killed, replacement = report["where"][0], report["replacement"]
    assert replacement["number"] == 0
    assert replacement["pid"] != killed["pid"]
    # Each node has one CPU, and the other actor holds the other node's.
    assert replacement["node"] == killed["node"]
    holding = [r for r in report["results"] if r[0] == "holding"]
    first = holding[: w.HOLDS]
    held_by_killed = sorted(r[4] for r in first if r[3] == killed["pid"])
    assert len(held_by_killed) == w.HOLDS // 2
    assert sorted(r[4] for r in holding[w.HOLDS :]) == held_by_killed  # dealt again
    done = [r for r in report["results"] if r[0] == "done" and r[4][0] == "hold"]
    assert sorted(r[4][1] for r in done) == list(range(w.HOLDS))
    assert all(r[3] != killed["pid"] for r in done)
    stats = report["stats"]
    assert (stats["respawns"], stats["redelivered"], stats["lost"]) == (1, w.HOLDS // 2, 0)
    # 2 "where", the messages, the holds, the replacement's "where".
    assert stats["processed"] == 2 + w.MESSAGES + w.HOLDS + 1


def test_gcs_address_uses_both_nodes_and_redelivers_after_ray_kill(cluster: Cluster) -> None:
    """address="127.0.0.1:P": one actor per node; ray.kill mid-run re-delivers its messages."""
    report = drive(cluster, cluster.address, kill=True)
    check_spread_and_results(report)
    check_kill(report)


@pytest.mark.parametrize("address", ["auto", "None"])
@pytest.mark.parametrize("ray_address", [False, True], ids=["found", "RAY_ADDRESS"])
def test_auto_and_none_join_the_cluster(cluster: Cluster, address: str, ray_address: bool) -> None:
    """address="auto" or None joins the cluster `ray start` made, or the one RAY_ADDRESS names."""
    env = {"RAY_ADDRESS": cluster.address} if ray_address else {}
    report = drive(cluster, address, env=env)
    check_spread_and_results(report)
    stats = report["stats"]
    assert (stats["processed"], stats["lost"], stats["respawns"]) == (2 + w.MESSAGES, 0, 0)


def test_ray_client_address_uses_both_nodes_and_redelivers_after_ray_kill(
    cluster: Cluster,
) -> None:
    """address="ray://127.0.0.1:Q" (Ray Client): the same, through the head's client server."""
    report = drive(cluster, f"ray://127.0.0.1:{cluster.client_port}", kill=True)
    check_spread_and_results(report)
    check_kill(report)


# A driver that only connects, and gives up soon: Ray's own retries take 20 s
# (GCS) or 30 s (Ray Client) to fail. Ray Client says why only in a DEBUG log.
CONNECT = """
import logging, sys, ray
client_log = logging.getLogger("ray.util.client.worker")
client_log.setLevel(logging.DEBUG)
client_log.addHandler(logging.StreamHandler())
address = sys.argv[1]
if address.startswith("ray://"):
    ray.util.connect(address.removeprefix("ray://"), connection_retries=1)
else:
    ray.init(address=address)
"""


def test_drivers_without_ray_auth_mode_are_refused(cluster: Cluster) -> None:
    """Without RAY_AUTH_MODE=token a driver is refused, with the token, by address or by ray://."""
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    env["RAY_NUM_REDIS_GET_RETRIES"] = "2"
    refused_by_gcs = "Authentication token is missing or incorrect"
    cases = [
        (cluster.address, env, refused_by_gcs),
        ("auto", env | {"RAY_ADDRESS": cluster.address}, refused_by_gcs),
        (f"ray://127.0.0.1:{cluster.client_port}", env, "Invalid or missing authentication token"),
    ]
    drivers = [
        subprocess.Popen(
            [sys.executable, "-c", CONNECT, address],
            env=driver_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for address, driver_env, _ in cases
    ]
    try:
        for (address, _, reason), driver in zip(cases, drivers, strict=True):
            _, err = driver.communicate(timeout=DRIVER_DEADLINE)
            assert driver.returncode != 0, address
            assert reason in err, err[-5000:]
    finally:
        for driver in drivers:
            if driver.poll() is None:
                driver.kill()
                driver.communicate()


def _listening(proc: psutil.Process) -> list[str]:
    try:
        connections = proc.net_connections(kind="inet")
    except psutil.Error:
        return []
    return [c.laddr.ip for c in connections if c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE)]


def test_every_server_of_the_cluster_listens_on_127_0_0_1_only(cluster: Cluster) -> None:
    """The cluster's processes, after all the drivers, listen on the loopback address only."""
    addresses = {ip for proc in _cluster_processes(cluster) for ip in _listening(proc)}
    assert addresses <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses
    assert addresses  # the GCS, the raylets, the client server...
