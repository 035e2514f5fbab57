"""A real two-node Ray cluster on this machine: `ray start` twice, the job sent with `ray job submit`.

The worker node has one logical GPU (`--num-gpus 1`) and the job embeds on `cuda`: the embedding
actors must be placed on that node, and under the test switch (NEGPREP_CUDA_ON_CPU) they run the
CUDA code path on CPU tensors, so the output must equal the CPU run's.

Each node has its own temp dir and ports, so other Ray clusters on the machine are untouched;
teardown kills only the processes this test started (never `ray stop`, which stops every Ray).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from negprep.config import parse_job
from negprep.runner import run_job

RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # auth off for this private test cluster: CLI clients default to no token (see stack notes)
    return env | {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _node(args: list[str], temp_dir: str, env: dict) -> subprocess.Popen:
    """`ray start --block`: the node's processes are this process's descendants, so they can be
    stopped by pid without touching any other cluster."""
    log = open(Path(temp_dir) / "start.log", "wb")  # noqa: SIM115 - lives as long as the node
    return subprocess.Popen(
        [RAY, "start", "--block", "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _stop(nodes: list[subprocess.Popen]) -> None:
    procs = []
    for n in nodes:
        try:
            p = psutil.Process(n.pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):  # it may end between the wait and the kill
            p.kill()


def _gpu_nodes(address: str, env: dict) -> list[str]:
    code = (f"import ray; ray.init(address={address!r}); "
            "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return r.stdout.strip().splitlines()[-1].split() if r.returncode == 0 else []


def _alive_nodes(address: str, env: dict) -> int:
    code = f"import ray; ray.init(address={address!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else 0


@pytest.mark.slow
def test_two_node_cluster_job_submit_equals_single_node(ray_session, tiny_bert, demo_data, tmp_path):
    job = {
        "input": str(demo_data),
        "model": str(tiny_bert),
        "num_negatives": 3,
        "range_max": 12,
        "read": {"shard_rows": 10, "query_shard_rows": 30},
        # two 1-CPU embedding actors on 1-CPU nodes: the pool only runs with both nodes in use
        "embed": {"actors": 2, "threads_per_actor": 1, "batch_size": 16, "dtype": "float32"},
        "search": {"shard_mb": 0.01},
    }
    run_job(parse_job({**job, "output": str(tmp_path / "single"), "work_dir": str(tmp_path / "single-work")}))
    single = pq.read_table(tmp_path / "single" / "data").to_pylist()

    env = _env()
    head_tmp, worker_tmp = (tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("rayh", "rayw"))  # short socket paths
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, w_agent, w_grpc, w_metrics, w_rt = _free_ports(11)
    ip = socket.gethostbyname(socket.gethostname())
    nodes = []
    try:
        nodes.append(
            _node(
                [
                    "--head",
                    f"--port={gcs}",
                    "--include-dashboard=true",  # the job server lives in the dashboard
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}",
                    f"--ray-client-server-port={client}",
                    f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--metrics-export-port={metrics}",
                    f"--runtime-env-agent-port={rt_env}",
                ],
                head_tmp,
                env,
            )
        )
        address = f"{ip}:{gcs}"
        deadline = time.time() + 120
        while time.time() < deadline and _alive_nodes(address, env) < 1:
            time.sleep(2)
        nodes.append(
            _node(
                [
                    f"--address={address}",
                    "--num-gpus=1",  # logical: Ray schedules it, nothing checks for CUDA
                    f"--dashboard-agent-listen-port={w_agent}",
                    f"--dashboard-agent-grpc-port={w_grpc}",
                    f"--metrics-export-port={w_metrics}",
                    f"--runtime-env-agent-port={w_rt}",
                ],
                worker_tmp,
                env,
            )
        )
        deadline = time.time() + 120
        while time.time() < deadline and _alive_nodes(address, env) < 2:
            time.sleep(2)
        assert _alive_nodes(address, env) == 2, (Path(worker_tmp) / "start.log").read_text()[-3000:]

        gpu_node = _gpu_nodes(address, env)
        assert len(gpu_node) == 1
        path = tmp_path / "cluster.yaml"
        on_gpu = {**job, "embed": {"device": "cuda", "dtype": "float32", "batch_size": 16}}
        path.write_text(yaml.safe_dump({**on_gpu, "output": str(tmp_path / "multi"), "work_dir": str(tmp_path / "mw")}))
        submit = [
            RAY, "job", "submit",
            f"--address=http://127.0.0.1:{dash}",
            "--submission-id=negprep-multinode-test",
            "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1", "NEGPREP_CUDA_ON_CPU": "1"}}),
            "--", sys.executable, "-m", "negprep", "run", str(path), "--quiet",
        ]  # fmt: skip
        r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        status = subprocess.run(
            [RAY, "job", "status", f"--address=http://127.0.0.1:{dash}", "negprep-multinode-test"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert "succeeded" in (status.stdout + status.stderr).lower()
        # a second submission with the same id is refused: a scheduler's retry cannot run the job twice
        again = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode != 0
    finally:
        _stop(nodes)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)
    assert (tmp_path / "multi" / "_SUCCESS").exists()
    assert pq.read_table(tmp_path / "multi" / "data").to_pylist() == single
    manifest = json.loads((tmp_path / "multi" / "manifest.json").read_text())
    assert manifest["model"]["device"] == "cuda"
    for part in ("corpus", "queries"):  # every embedding actor ran on the node with the GPU
        assert manifest["stages"]["embed"][part]["nodes"] == gpu_node
