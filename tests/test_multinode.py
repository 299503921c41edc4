"""A real two-node Ray cluster on this machine, jobs submitted to it with `ray job submit`.

The head (`ray start --head`, 1 CPU, node address 127.0.0.2) and a second node (`ray start
--address`, 1 CPU, node address 127.0.0.3) are separate `ray start --block` processes, each in its own
session, with ports of their own, so they never touch the pytest session's Ray (or anyone else's):
they are stopped by signalling their `ray start` process, never with `ray stop`, which would kill
every Ray on the machine.

The two nodes share the filesystem, as NFS would, except one directory: the second node runs in its
own mount namespace with a tmpfs over `local/`, so `local/` is real node-local storage there.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from qdeep.data.synth import write_synthetic_classes, write_synthetic_planet
from qdeep.distributed.worker import CHECKPOINT_FILE
from qdeep.clustering.store import FeatureStore
from qdeep.io import filesystem, read_json, read_text, unfinished

pytestmark = pytest.mark.multinode  # real multi-node Ray clusters: `make test-fast` leaves this module out

HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"  # loopback addresses: one per node, both on this machine
BIN = Path(sys.executable).parent  # the venv's python, ray and qdeep
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 240
TINY = ["--arch", "resnet18", "--weights", "none", "--epochs", "1", "--image-size", "32", "--batch-size", "16",
        "--loader-workers", "0", "--warmup-steps", "2"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_processes(sid: int) -> list[int]:
    """Every process whose session is `sid` (a `ray start` started with its own session, and all the
    GCS, raylet, dashboard and worker processes it spawned)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


@dataclass(repr=False)
class Job:
    id: str
    status: str  # SUCCEEDED, FAILED, STOPPED, ...
    logs: str

    def __repr__(self) -> str:  # what a failed assertion shows
        return f"job {self.id} ended {self.status}; its logs:\n{self.logs[-6000:]}"


class LoopbackCluster:
    """Two `ray start --block` processes (or the head alone); `submit` runs a job with `ray job submit`."""

    def __init__(self, base: Path):
        self.base = base
        self.shared = base / "shared"  # seen by both nodes (the same disk: like NFS)
        self.local = base / "local"  # node-local: a tmpfs on the second node, this disk on the head
        self.shared.mkdir()
        self.local.mkdir()
        ports = _free_ports(11)
        self.port, self.dashboard_port = ports[:2]
        self._head_ports = ports[2:11]
        self.gcs = f"{HEAD_IP}:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # Nothing of the pytest session's Ray (RAY_ADDRESS, loopback-only mode) leaks into the nodes.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "QDEEP_TEST_"))}
        self.env = {**env, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.procs: list[subprocess.Popen] = []

    def _ray_start(self, args: list[str], log: Path, env: dict, prefix: list[str] = ()) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen([*prefix, str(BIN / "ray"), "start", "--block", *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        deadline = time.time() + START_TIMEOUT_S
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed ({log}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        return proc

    def start(self, nodes: int = 2) -> None:
        """The head, then (nodes=2) the second node."""
        # Processes on the nodes (Ray Train's helpers query the state API) find this cluster, not another
        # Ray on the machine; SIGTERM tears a node down at once instead of draining it for 30 s.
        self.node_env = {**self.env, "RAY_ADDRESS": self.gcs, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        client, node_manager, object_manager, agent, agent_grpc, runtime_env, metrics, dash_metrics, \
            autoscaler_metrics = self._head_ports
        self._ray_start(
            ["--head", "--node-ip-address", HEAD_IP, "--port", str(self.port), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(client),
             "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
             "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
             "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics), *self._common],
            self.base / "head.log", {**self.node_env, "DASHBOARD_METRIC_PORT": str(dash_metrics),
                                     "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics)})
        if nodes == 1:
            self._wait_for_nodes(1)
            return
        self.start_node()

    @property
    def _common(self) -> list[str]:
        temp = self.base / "ray"  # one temp dir for both nodes, apart from the session's /tmp/ray
        return ["--num-cpus", "1", "--min-worker-port", "0", "--max-worker-port", "0", "--temp-dir", str(temp),
                "--disable-usage-stats"]

    def start_node(self) -> None:
        """The second node (again, after `kill_node`: as an autoscaler replaces a lost machine)."""
        node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = _free_ports(6)
        # Its own mount namespace (private propagation): the tmpfs over local/ exists for this node only.
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            unshare[1:1] = ["--user", "--map-root-user"]
        self.node = self._ray_start(
            ["--address", self.gcs, "--node-ip-address", NODE_IP, "--node-manager-port", str(node_manager),
             "--object-manager-port", str(object_manager), "--dashboard-agent-listen-port", str(agent),
             "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
             "--metrics-export-port", str(metrics), *self._common],
            self.base / f"node-{len(self.procs)}.log", self.node_env,
            prefix=[*unshare, "sh", "-c", 'mount -t tmpfs qdeep-node-local "$0" && exec "$@"', str(self.local)])
        self._wait_for_nodes(2)

    def kill_node(self) -> None:
        """The second machine dies: SIGKILL to its raylet, its workers, everything of its `ray start`."""
        for pid in _session_processes(self.node.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.node.wait(timeout=30)

    def _wait_for_nodes(self, n: int) -> None:
        deadline, out = time.time() + START_TIMEOUT_S, ""
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5)
            except urllib.error.HTTPError:
                pass  # answering (maybe asking for the token): up
            except OSError:
                time.sleep(1)
                continue
            out = self.ray("status", "--address", self.gcs, timeout=60).stdout
            if len(re.findall(r"^\s*1 node_", out, re.M)) == n:
                return
            time.sleep(1)
        raise RuntimeError(f"the {n}-node cluster did not come up; ray status:\n{out}")

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, *entrypoint: str, timeout: float = JOB_TIMEOUT_S, env: dict | None = None) -> Job:
        """Run `entrypoint` as a Ray job (its driver on the head, no CPU of its own; `env` in its runtime
        environment) and wait for it."""
        job_id = f"qdeep-test-{uuid.uuid4().hex[:8]}"
        runtime = ["--runtime-env-json", json.dumps({"env_vars": env})] if env else []
        try:
            self.ray("job", "submit", "--address", self.dashboard, "--submission-id", job_id,
                     "--entrypoint-num-cpus", "0", *runtime, "--", *entrypoint, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.ray("job", "stop", "--address", self.dashboard, job_id)
        status = self.ray("job", "status", "--address", self.dashboard, job_id)
        text = status.stdout + status.stderr  # "Job 'ID' succeeded" / "failed", or "Status for job 'ID': RUNNING"
        found = re.search(rf"Job '{job_id}' (\w+)|Status for job '{job_id}': (\w+)", text)
        logs = self.ray("job", "logs", "--address", self.dashboard, job_id).stdout
        return Job(job_id, (found.group(1) or found.group(2)).upper() if found else f"unknown: {text}", logs)

    def qdeep(self, *args: str, timeout: float = JOB_TIMEOUT_S, env: dict | None = None) -> Job:
        return self.submit(str(BIN / "qdeep"), *args, timeout=timeout, env=env)

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node's processes), then SIGKILL whatever is
        left in their sessions; fail if anything survives."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + 30
        while (left := [pid for p in self.procs for pid in _session_processes(p.pid)]) and time.time() < deadline:
            time.sleep(1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)
        left = [pid for p in self.procs for pid in _session_processes(p.pid)]
        assert not left, f"Ray processes of the test cluster survived SIGKILL: {left}"


@pytest.fixture(scope="module")
def cluster():
    with _loopback("qdmn-") as c:
        write_synthetic_planet(c.shared / "data", n=160, size=32, seed=1, n_test=8)
        yield c


@contextlib.contextmanager
def _loopback(prefix: str, nodes: int = 2):
    """A started LoopbackCluster under a fresh short /tmp dir (Ray's socket paths live under it),
    stopped and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    c = LoopbackCluster(base)
    try:
        c.start(nodes=nodes)
        yield c
    finally:
        try:
            c.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _train_args(c: LoopbackCluster, out: str, *extra: str) -> list[str]:
    return ["train", "--data", str(c.shared / "data"), "--out", str(c.shared / out),
            "--tracking-uri", f"sqlite:///{c.shared / 'mlflow.db'}", *TINY, *extra]


def _one_error(job: Job) -> str:
    errors = [line for line in job.logs.splitlines() if line.startswith("qdeep: error:")]
    assert len(errors) == 1, job
    return errors[0]


@pytest.fixture
def lone_head():
    """A `ray start --head` with no other node up yet: what an autoscaling cluster is before its GPU
    nodes start. Function-scoped and first in this file, so it is gone before the two-node cluster starts."""
    with _loopback("qdmh-", nodes=1) as c:
        write_synthetic_planet(c.shared / "data", n=16, size=32, seed=1, n_test=4)  # the inputs must exist
        yield c


def test_a_cluster_that_can_gain_nodes_refuses_local_paths_while_one_node_is_up(lone_head):
    c = lone_head
    runs = c.shared / "runs"
    job = c.qdeep(*_train_args(c, "out-lone", "--storage-path", str(runs)), timeout=120)
    assert job.status == "FAILED", job
    error = _one_error(job)
    assert f"storage path {runs} cannot be shown to be shared: this Ray cluster can gain nodes" in error, job
    assert f"only {HEAD_IP} is up" in error and "s3://" in error and "RAY_ADDRESS" in error
    # Shared storage, but the default-style MLflow store: a SQLite file rank 0 on a GPU node could not open.
    db = c.shared / "mlflow.db"
    job = c.qdeep(*_train_args(c, "out-lone", "--storage-path", "s3://qdeep-no-such-bucket/runs"), timeout=120)
    assert job.status == "FAILED", job
    error = _one_error(job)
    assert f"MLflow store sqlite:///{db}: its directory {c.shared} cannot be shown to be shared" in error, job
    assert "MLFLOW_TRACKING_URI=http://HEAD:5000" in error and "--tracking-uri" in error
    assert not db.exists() and not (c.shared / "out-lone" / "metrics.json").exists()


OWN = """
import ray
from qdeep.distributed.session import ray_session
with ray_session():
    print("gcs", ray.get_runtime_context().gcs_address)
"""


def test_without_an_address_a_command_starts_its_own_ray_beside_a_ray_start_head(lone_head):
    """A `ray start --head` runs on this machine: a bare ray.init() finds its GCS process and joins
    it; a qdeep command given no --address and no RAY_ADDRESS starts its own Ray, as the README says."""
    # RAY_TMPDIR: where Ray looks for the latest `ray start`'s address (the head's --temp-dir is under it).
    done = subprocess.run([str(BIN / "python"), "-c", OWN], capture_output=True, text=True, timeout=180,
                          env={**lone_head.env, "RAY_TMPDIR": str(lone_head.base)}, cwd=lone_head.base)
    assert done.returncode == 0, done.stderr[-3000:]
    gcs = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("gcs "))
    assert gcs.startswith("127.0.0.1:") and gcs != lone_head.gcs, done.stdout


def test_elastic_workers_train_on_both_nodes(cluster):
    """`--workers 1-2` with both nodes up: one worker on each, checkpoints on the shared storage,
    rank 0's and the driver's metrics in the shared MLflow store."""
    job = cluster.qdeep(*_train_args(cluster, "out-elastic", "--workers", "1-2", "--name", "elastic",
                                     "--storage-path", str(cluster.shared / "runs")))
    assert job.status == "SUCCEEDED", job
    m = json.loads((cluster.shared / "out-elastic" / "metrics.json").read_text())
    assert m["epochs_completed"] == 1 and [(h["workers"], h["nodes"]) for h in m["history"]] == [(2, 2)], job
    run_dir = cluster.shared / "runs" / "elastic"
    checkpoints = [c for c in run_dir.glob("checkpoint_*") if c.is_dir()]
    assert checkpoints and all((c / CHECKPOINT_FILE).is_file() for c in checkpoints), job
    assert m["ray_run_path"] == str(run_dir)
    recorded = json.loads((run_dir / "qdeep_run.json").read_text())
    assert recorded["settings"]["workers"] == "1-2"

    import mlflow

    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cluster.shared / 'mlflow.db'}").get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["workers"] == "1-2"
    assert {"train_loss", "val_f2", "best_val_f2"} <= set(run.data.metrics)  # rank 0's and the driver's


def test_deepcluster_job(cluster):
    scenes = cluster.shared / "scenes"
    write_synthetic_classes(scenes, n_per_class=8, size=32, seed=5)
    out = cluster.shared / "dc"
    job = cluster.qdeep("deepcluster", "--images", str(scenes), "--data", str(scenes), "--arch", "resnet18",
                        "--weights", "none", "--image-size", "32", "--k", "3", "--iterations", "1", "--final-k", "3",
                        "--workers", "2", "--loader-workers", "0", "--batch-size", "16", "--out", str(out),
                        "--tracking-uri", f"sqlite:///{cluster.shared / 'mlflow.db'}")
    assert job.status == "SUCCEEDED", job
    m = json.loads((out / "metrics.json").read_text())
    assert [h["iteration"] for h in m["iterations"]] == [1] and m["final"]["k"] == 3, job
    assert (out / "assignments.parquet").is_file() and (out / "iterations" / "iter_01" / "model.pt").is_file()
    # Inside the loop k-means runs in the first worker; the final one, on a cluster that may gain nodes, as
    # a Ray task (asking for memory, or a GPU), not in the driver.
    assert m["iterations"][0]["phases"]["kmeans_on"] in (f"rank 0 on {HEAD_IP}", f"rank 0 on {NODE_IP}"), m
    assert m["final"]["kmeans_on"] in (f"task on {HEAD_IP}", f"task on {NODE_IP}"), m
    assert len(list((out / "grids").glob("cluster_*.png"))) >= 1


def test_a_lost_node_costs_one_restart_and_no_finished_epoch(cluster, s3_bucket):
    """The second node dies (SIGKILL of its raylet and workers) while a 2-worker run trains, and a new
    one joins, as an autoscaler replaces a lost machine: the run resumes from its last checkpoint in the
    bucket, once, and every epoch appears once in its history. The test plugin's gate holds the run at
    the start of epoch 1 (its epoch-0 checkpoint registered) while the node is killed. The images come
    from a pack in the bucket, so the new node reads them from there too."""
    from qdeep.cli import main

    runs, pack = f"{s3_bucket}/runs", f"{s3_bucket}/pack"
    assert main(["pack", "--data", str(cluster.shared / "data"), "--out", pack, "--shard-mb", "1"]) == 0
    held, opened = cluster.shared / "lost-held", cluster.shared / "lost-open"
    args = ["--plugin", "qdeep_test_hooks", *_train_args(cluster, "out-lost", "--workers", "2", "--name", "lost",
                                                          "--epochs", "3", "--max-failures", "1", "--storage-path", runs)]
    args[args.index("--data") + 1] = pack
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(cluster.qdeep, *args, env={"QDEEP_TEST_GATE": f"{held}:{opened}:1"})
        deadline = time.time() + JOB_TIMEOUT_S
        while not held.exists():
            assert not running.done() and time.time() < deadline, running.result() if running.done() else "not held"
            time.sleep(0.2)
        cluster.kill_node()
        opened.write_text("go\n")
        cluster.start_node()
        job = running.result()
    assert job.status == "SUCCEEDED", job
    m = json.loads((cluster.shared / "out-lost" / "metrics.json").read_text())
    assert m["restarts"] == 1 and [h["epoch"] for h in m["history"]] == [0, 1, 2], job
    assert m["history"][-1]["restarts"] == 1 and m["history"][0]["restarts"] == 0, job
    assert m["ray_run_path"] == f"{runs}/lost"


def test_every_command_reads_a_pack_in_the_bucket_on_a_node_without_the_data(cluster, s3_bucket):
    """The images exist on the head's disk alone (`local/`, which the second node cannot see): packed
    into the bucket, they train a 2-worker run over both nodes, its checkpoints and outputs in the
    bucket too; the model in the bucket predicts the pack's test images into the bucket; then
    `features`, a 2-trial sweep and 2 DeepCluster iterations read the pack and write only there."""
    from qdeep.cli import main

    data = cluster.local / "pack-source"
    write_synthetic_planet(data, n=64, size=32, seed=4, n_test=4)
    pack, out = f"{s3_bucket}/pack", f"{s3_bucket}/out-pack"
    assert main(["pack", "--data", str(data), "--out", pack, "--shard-mb", "1"]) == 0  # this session's own Ray
    args = _train_args(cluster, "unused", "--workers", "2", "--name", "from-pack")
    args[args.index("--data") + 1], args[args.index("--out") + 1] = pack, out
    job = cluster.qdeep(*args)
    assert job.status == "SUCCEEDED", job
    m = read_json(f"{out}/metrics.json")
    assert [(h["workers"], h["nodes"]) for h in m["history"]] == [(2, 2)], job
    assert m["n_train"] + m["n_val"] == 64 and m["ray_run_path"] == f"{out}/ray_results/from-pack"
    assert unfinished(out) is None and not (cluster.shared / "unused").exists()
    job = cluster.qdeep("predict", "--model", f"{out}/model", "--data", pack, "--out", f"{s3_bucket}/sub.csv")
    assert job.status == "SUCCEEDED", job
    fs, inner = filesystem(f"{s3_bucket}/sub.csv")
    with fs.open_input_stream(inner) as f:
        lines = f.read().decode().splitlines()
    assert lines[0] == "image_name,tags" and sorted(line.split(",")[0] for line in lines[1:]) == \
        sorted(p.stem for p in (data / "test-jpg").glob("*.jpg"))

    tiny = ["--weights", "none", "--image-size", "32"]
    job = cluster.qdeep("features", "--images", pack, "--arch", "resnet18", *tiny, "--out", f"{s3_bucket}/store")
    assert job.status == "SUCCEEDED", job
    assert FeatureStore(f"{s3_bucket}/store").total_rows == 68  # training and test images
    tracking = ["--tracking-uri", f"sqlite:///{cluster.shared / 'mlflow.db'}"]
    job = cluster.qdeep("tune", "--data", pack, "--archs", "resnet18", "--lr", "1e-3,3e-3", "--epochs", "1",
                        "--scheduler", "none", "--workers-per-trial", "1", "--batch-size", "16", "--loader-workers",
                        "0", *tiny, "--out", f"{s3_bucket}/sweep", *tracking)
    assert job.status == "SUCCEEDED", job
    trials = list(csv.DictReader(read_text(f"{s3_bucket}/sweep/results.csv").splitlines()))
    assert sorted(float(t["lr"]) for t in trials) == [1e-3, 3e-3] and {t["status"] for t in trials} == {"completed"}
    job = cluster.qdeep("deepcluster", "--images", pack, "--arch", "resnet18", *tiny, "--k", "3", "--iterations", "2",
                        "--final-k", "3", "--workers", "2", "--loader-workers", "0", "--batch-size", "8",
                        "--out", f"{s3_bucket}/dc", *tracking)
    assert job.status == "SUCCEEDED", job
    m = read_json(f"{s3_bucket}/dc/metrics.json")
    assert [h["iteration"] for h in m["iterations"]] == [1, 2] and m["n_images"] == 68
    assert m["iterations"][1]["weights"] == f"{s3_bucket}/dc/iterations/iter_01/model.pt"
    assert sum(m["final"]["sizes"]) + sum(m["final"]["sizes_ctrl"]) == 68 and unfinished(f"{s3_bucket}/dc") is None


def test_node_local_mlflow_store_is_refused(cluster):
    db = cluster.local / "mlflow.db"
    args = _train_args(cluster, "out-mlflow", "--workers", "2", "--storage-path", str(cluster.shared / "runs"),
                       "--name", "mlflow-local")
    args[args.index("--tracking-uri") + 1] = f"sqlite:///{db}"
    job = cluster.qdeep(*args, timeout=120)
    assert job.status == "FAILED", job
    error = _one_error(job)
    assert f"MLflow store sqlite:///{db}: its directory {cluster.local} is not shared" in error, job
    assert f"not visible on {NODE_IP} (node " in error and "MLFLOW_TRACKING_URI=http://HEAD:5000" in error
    assert not db.exists() and not (cluster.shared / "runs" / "mlflow-local").exists()


def test_images_on_the_head_alone_are_refused_naming_the_blind_node(cluster):
    """Images on the head's disk only: with `--on-bad-image skip` the check used to drop, as
    undecodable, whatever the other node's tasks could not open."""
    data = cluster.local / "data"
    write_synthetic_planet(data, n=24, size=32, seed=2, n_test=4)
    args = _train_args(cluster, "out-images", "--workers", "2", "--storage-path", str(cluster.shared / "runs"),
                       "--name", "images-local", "--on-bad-image", "skip")
    args[args.index("--data") + 1] = str(data)
    job = cluster.qdeep(*args, timeout=120)
    assert job.status == "FAILED", job
    error = _one_error(job)
    assert f"images not visible from node {NODE_IP} (node " in error and "do not exist there" in error, job
    assert "cannot decode" not in job.logs and HEAD_IP not in error
    assert not (cluster.shared / "runs" / "images-local").exists()


def test_node_local_storage_path_is_refused(cluster):
    runs = cluster.local / "runs"
    job = cluster.qdeep(*_train_args(cluster, "out-local", "--workers", "2", "--storage-path", str(runs)),
                        timeout=120)
    assert job.status == "FAILED", job
    errors = [line for line in job.logs.splitlines() if line.startswith("qdeep: error:")]
    assert len(errors) == 1, job
    assert f"storage path {runs} is not shared" in errors[0] and f"not visible on {NODE_IP} (node " in errors[0]
    assert HEAD_IP not in errors[0] and "s3://" in errors[0]
    assert list(runs.iterdir()) == []  # the marker is gone, nothing was trained
    assert not (cluster.shared / "out-local" / "metrics.json").exists()


PROBE = """
import json, sys, uuid
from pathlib import Path
import ray
from qdeep.distributed import storage

shared, local = sys.argv[1:]
ray.init()
ids = {n["NodeManagerAddress"]: n["NodeID"] for n in storage.alive_nodes()}
out = {}
for name, root in (("shared", shared), ("local", local)):
    token = uuid.uuid4().hex
    marker = Path(root) / ("probe-" + token)
    marker.write_text(token)
    seen = storage.nodes_seeing(str(marker), token, list(ids.values()))
    out[name] = {ip: seen[node] for ip, node in ids.items()}
storage.check_shared_storage(shared)
storage.check_shared_storage("s3://qdeep-no-such-bucket/runs")  # offline: any probe would fail
print("PROBE " + json.dumps(out))
"""


def test_storage_probe_sees_which_nodes_share_a_path(cluster):
    script = cluster.shared / "probe.py"
    script.write_text(PROBE)
    job = cluster.submit(str(BIN / "python"), str(script), str(cluster.shared), str(cluster.local), timeout=120)
    assert job.status == "SUCCEEDED", job
    probe = json.loads(next(line for line in job.logs.splitlines() if line.startswith("PROBE "))[6:])
    assert probe == {"shared": {HEAD_IP: True, NODE_IP: True}, "local": {HEAD_IP: True, NODE_IP: False}}, job
