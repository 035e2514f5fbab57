"""The stage contract: every stage reused when finished, recomputed under --force / --from, and every
model a job names resolved before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from negprep.config import parse_job
from negprep.errors import ConfigError
from negprep.runner import run_job
from negprep.stages import NAMES, STAGES


def _job(tmp_path, data, model, **kw) -> dict:
    guide = {"model": str(model), "dtype": "bfloat16", "absolute_margin": 0.0, "relative_margin": None}
    # the miner in float32 (dtype auto is bfloat16 on CPUs that multiply it natively)
    return {"input": str(data), "output": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
            "model": str(model), "embed": {"dtype": "float32"}, "num_negatives": 2, "range_max": 10, "guide": guide,
            "batch_size": 4, **kw}


def _reuse(m: dict) -> dict:
    """What each cached stage reused in a run, from its manifest."""
    e, g = m["stages"]["embed"], m["stages"]["guide"]
    return {
        "embed": e["corpus"]["shards_reused"] + e["queries"]["shards_reused"],
        "search": m["stages"]["search"]["reused"],
        "guide": g["reused"],
        "guide_embed": sum(p["shards_reused"] for p in g.get("embed", {}).values()),
        "guide_embedded": sum(p["rows_embedded"] for p in g.get("embed", {}).values()),
        "cluster": m["clusters"]["reused"],
    }


def test_every_stage_is_reused_without_force_and_recomputed_from_the_named_stage(ray_session, tiny_bert, demo_data,
                                                                                 tmp_path):
    # a bfloat16 guide of the same weights: another encoder key, so it has caches of its own
    job = parse_job(_job(tmp_path, demo_data, tiny_bert))
    first = _reuse(run_job(job))
    assert first["embed"] == first["search"] == first["guide"] == 0 and first["cluster"] is False
    assert first["guide_embedded"] > 0

    again = run_job(job, overwrite=True)
    r = _reuse(again)
    assert r["embed"] == 2 and r["search"] == r["guide"] == 1 and r["cluster"] is True
    assert again["batches"]["rows_batched"] == again["rows"] > 0  # batch has nothing to reuse: it always runs

    # --from guide: read, embed and search reused; the guide's scores, its passage shards and its
    # embeddings recomputed, and every later stage
    r = _reuse(run_job(job, overwrite=True, redo="guide"))
    assert r["embed"] == 2 and r["search"] == 1
    assert r["guide"] == 0 and r["guide_embed"] == 0 and r["guide_embedded"] == first["guide_embedded"]
    assert r["cluster"] is False

    # --from cluster: the guide's scores reused, the clusters recomputed
    r = _reuse(run_job(job, overwrite=True, redo="cluster"))
    assert r["guide"] == 1 and r["cluster"] is False

    # --force (the first stage): nothing reused anywhere
    m = run_job(job, overwrite=True, redo=NAMES[0])
    r = _reuse(m)
    assert r["embed"] == r["search"] == r["guide"] == r["guide_embed"] == 0 and r["cluster"] is False
    assert set(m["timings_s"]) >= {"read", "embed", "search", "guide", "cluster", "mine", "batch", "total"}


def test_from_choices_are_the_stages(tmp_path, monkeypatch):
    from negprep import cli

    assert tuple(s.name for s in STAGES) == NAMES
    with pytest.raises(SystemExit):
        cli.main(["run", "job.yaml", "--from", "nonsense"])  # argparse refuses a name that is no stage
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"input": str(tmp_path), "output": str(tmp_path / "out")}))
    calls = []
    monkeypatch.setattr("negprep.runner.run_job", lambda job, overwrite, redo: calls.append(redo) or {})
    monkeypatch.setattr("negprep.output.summary.format_summary", lambda m: "")
    for name in NAMES:
        assert cli.main(["run", str(path), "--from", name]) == 0
    assert cli.main(["run", str(path), "--force"]) == 0
    assert calls == [*NAMES, "read"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "negprep", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["biencoder", "crossencoder"])
def test_misspelt_guide_model_is_one_line_before_ray(tmp_path, tiny_bert, demo_data, kind):
    job = _job(tmp_path, demo_data, tiny_bert, guide={"model": "no-such-guide-anywhere", "type": kind})
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    for command in ("validate", "run"):
        r = _cli(command, str(path))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines() == ["negprep: error: model 'no-such-guide-anywhere': not a directory, an "
                                                 "installed model package, or a hub id in the local Hugging Face "
                                                 "cache (HF_HUB_OFFLINE is set)"]
    # nothing started: no stage wrote anything, no output
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_renamed_key_names_the_new_one(tmp_path):
    with pytest.raises(ConfigError, match="key 'rejected' is now called 'dropped'"):
        parse_job({"input": "x", "output": str(tmp_path / "out"), "rejected": str(tmp_path / "audit")})
