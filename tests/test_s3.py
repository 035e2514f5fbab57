"""Object storage end to end, against a real S3 HTTP server (moto's server mode) on loopback.

The session's Ray starts before this server exists, so in-process jobs name the endpoint in the
job's `storage`; the AWS_ENDPOINT_URL-only check runs the CLI as a subprocess with its own Ray.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from negprep import storage
from negprep.config import parse_job
from negprep.errors import ConfigError
from negprep.output.summary import format_summary
from negprep.runner import run_job

BUCKET = "negprep-test"
KEY = "AKIDNEGPREPTEST0001"
SECRET = "s3cr3t-NEGPREP-do-not-print-7f3a9c"


@pytest.fixture(scope="module")
def s3():
    """(endpoint URL, s3fs filesystem) of a fresh moto server with one bucket."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET, use_listings_cache=False)
    fs.mkdir(BUCKET)
    yield endpoint, fs
    server.stop()


@pytest.fixture(scope="module")
def s3_towns(s3, demo_data) -> str:
    """The demo collection (40 towns) uploaded to the bucket, as a BEIR directory URL."""
    _, fs = s3
    for f in sorted(Path(demo_data).rglob("*")):
        if f.is_file():
            fs.pipe_file(f"{BUCKET}/towns/{f.relative_to(demo_data).as_posix()}", f.read_bytes())
    return f"s3://{BUCKET}/towns"


def _job(prefix: str, towns: str, model, **kw) -> dict:
    return {
        "input": towns,
        "output": f"s3://{BUCKET}/{prefix}/out",
        "work_dir": f"s3://{BUCKET}/{prefix}/work",
        "model": str(model),
        "num_negatives": 3,
        "range_max": 20,
        "embed": {"batch_size": 16},
        **kw,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_env(endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    return env | {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def _cli(job: dict, tmp_path: Path, env: dict[str, str], *args: str, timeout: int = 60):
    path = tmp_path / f"job-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(job))
    cmd = [sys.executable, "-m", "negprep", "run", str(path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_storage_options_are_translated_and_secrets_redacted(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    opts = {"region": "eu-west-1", "addressing_style": "path", "aws_secret_access_key": "x", "requester_pays": True}
    assert storage.fs_options("s3://b/x", opts) == {
        "use_listings_cache": False,
        "secret": "x",
        "requester_pays": True,
        "endpoint_url": "http://from-env:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
    }
    assert storage.fs_options("s3://b/x", {"endpoint_url": "http://job:1"})["endpoint_url"] == "http://job:1"
    assert storage.fs_options("/local/dir", opts) == {}
    with pytest.raises(ConfigError, match="storage: unknown key 'endpoint_ulr'"):
        parse_job({"input": "s3://b/in", "output": "s3://b/out", "storage": {"endpoint_ulr": "http://x"}})
    with pytest.raises(ConfigError, match="endpoint_url must be an http"):
        parse_job({"input": "s3://b/in", "output": "s3://b/out", "storage": {"endpoint_url": "minio:9000"}})
    assert storage.redact("see https://bob:hunter2@host/x?X-Amz-Signature=abc&n=1") == (
        "see https://bob:***@host/x?X-Amz-Signature=***&n=1"
    )
    assert storage.redact_options({"key": "k", "secret": "s", "endpoint_url": "http://e"}) == {
        "key": "***",
        "secret": "***",
        "endpoint_url": "http://e",
    }
    # a job's secrets are masked in messages and log lines from then on; other keys are not guessed at
    storage.remember_secrets(
        {"output": "https://u:pw-0123456789@h/x", "storage": {"secret": "zz-secret-99"}, "tokenizer": "visible"}
    )
    assert storage.redact("pw-0123456789 zz-secret-99 visible") == "*** *** visible"
    stream = io.StringIO()
    logger = logging.getLogger("negprep.test_s3")
    logger.addHandler(logging.StreamHandler(stream))
    logger.propagate = False
    storage.install_log_redaction(logger)
    logger.warning("reading with %s", "zz-secret-99")
    assert stream.getvalue() == "reading with ***\n"


def test_job_on_s3_resumes_refuses_overwrites_and_reads_back(
    ray_session, tiny_bert, s3, s3_towns, tmp_path, monkeypatch
):
    import datasets
    import polars as pl

    endpoint, fs = s3
    so = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET, "region": "us-east-1"}
    job = parse_job(_job("lib", s3_towns, tiny_bert, storage=so))
    first = run_job(job)
    out = f"{BUCKET}/lib/out"
    assert {"_SUCCESS", "data", "manifest.json"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(out)}
    assert first["rows"] > 0 and first["stages"]["embed"]["corpus"]["shards_reused"] == 0

    with pytest.raises(ConfigError, match="output exists") as refused:
        run_job(job)
    # The rerun takes its keys from the environment. The session's Ray workers started without
    # them, so they can only have them from the driver (in the pickled Folders), as on a cluster.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    job = parse_job(_job("lib", s3_towns, tiny_bert, storage={"endpoint_url": endpoint}))
    fs.pipe_file(f"{out}/data/train-99999-of-99999.parquet", b"stale")
    # an overwrite reuses the work directory on S3 and replaces the output whole
    second = run_job(job, overwrite=True)
    emb = second["stages"]["embed"]
    assert emb["corpus"]["shards_reused"] == emb["corpus"]["shards"] >= 1
    assert emb["corpus"]["rows_embedded"] == 0 and second["stages"]["search"]["reused"] == 1
    assert second["counts"] == first["counts"]
    data = sorted(fs.ls(f"{out}/data"))
    assert [f"{BUCKET}/lib/out/{f}" for f in second["data_files"]] == data  # the stale file is gone

    # secrets: not in the manifest (stored or returned), the summary or the refusal
    text = fs.cat_file(f"{out}/manifest.json").decode()
    summary = format_summary(second)
    for where in (text, summary, str(refused.value), json.dumps(first), json.dumps(second)):
        assert SECRET not in where and KEY not in where
    assert json.loads(text)["config"]["storage"] == {"endpoint_url": endpoint}
    saved = first["config"]["storage"]
    assert saved == {"endpoint_url": endpoint, "key": "***", "secret": "***", "region": "us-east-1"}

    # readers: polars and datasets straight from S3
    pl_opts = {
        "aws_endpoint_url": endpoint,
        "aws_region": "us-east-1",
        "aws_allow_http": "true",
        "aws_access_key_id": KEY,
        "aws_secret_access_key": SECRET,
    }
    frame = pl.scan_parquet(f"s3://{out}/data/*.parquet", storage_options=pl_opts).collect()
    assert frame.height == second["rows"] and frame.columns[:3] == ["query", "positive", "negative"]
    # datasets takes every remote URL for the Hub under HF_HUB_OFFLINE=1; S3 is not the Hub
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    ds = datasets.load_dataset(
        "parquet",
        data_files=f"s3://{out}/data/*.parquet",
        storage_options={"endpoint_url": endpoint, "key": KEY, "secret": SECRET},
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert ds.num_rows == second["rows"] and ds.column_names[:3] == ["query", "positive", "negative"]


def test_cli_with_only_aws_environment(tiny_bert, s3, s3_towns, tmp_path):
    """The acceptance check: AWS_ENDPOINT_URL and the keys in the environment, nothing in the job."""
    endpoint, fs = s3
    job = _job("cli", s3_towns, tiny_bert, ray={"num_cpus": 2, "object_store_mb": 256})
    del job["work_dir"]  # default: <output>-work, on S3 too
    # a short temp dir of its own: Ray's socket paths are length-limited, and its logs are checked below
    ray_tmp = tempfile.mkdtemp(prefix="np-s3-", dir="/tmp")
    try:
        r = _cli(job, tmp_path, _cli_env(endpoint, RAY_TMPDIR=ray_tmp), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        manifest = json.loads(fs.cat_file(f"{BUCKET}/cli/out/manifest.json"))
        assert fs.exists(f"{BUCKET}/cli/out/_SUCCESS") and fs.ls(f"{BUCKET}/cli/out-work/embeddings")
        assert manifest["rows"] > 0 and f"{manifest['rows']:,}" in r.stdout
        assert SECRET not in r.stdout + r.stderr + json.dumps(manifest)
        # nor in anything Ray wrote for this run (the runtime_env carries the AWS variables to workers)
        for f in Path(ray_tmp).rglob("*"):
            if f.is_file() and f.stat().st_size < 50 << 20 and not f.is_socket():
                assert SECRET.encode() not in f.read_bytes(), f
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("case", ["missing_bucket", "wrong_endpoint", "url_credentials"])
def test_cli_storage_errors_are_one_line_exit_2(tmp_path, s3, s3_towns, case):
    endpoint, _ = s3
    job = {"input": s3_towns, "output": f"s3://{BUCKET}/err/out"}  # keys and endpoint from the environment
    env = _cli_env(endpoint)
    if case == "missing_bucket":
        job["output"] = "s3://no-such-bucket-negprep/out"
        expect = "output: s3://no-such-bucket-negprep/out: bucket 'no-such-bucket-negprep' does not exist"
    elif case == "wrong_endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_free_port()}"
        expect = f"corpus: {s3_towns}/corpus.jsonl: cannot reach the storage endpoint"
    else:  # credentials written into a URL never come back in the message
        job["work_dir"] = f"s3://{KEY}:{SECRET}@{BUCKET}/work"
        job["storage"] = {"key": KEY, "secret": SECRET}
        expect = f"work_dir: s3://***:***@{BUCKET}/work: storage error (Parameter validation failed: Invalid bucket"
    r = _cli(job, tmp_path, env)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert SECRET not in r.stderr + r.stdout
