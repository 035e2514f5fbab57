"""ray_cluster.yaml is a valid cluster-launcher file for the installed Ray, with pinned versions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_and_validation():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _config()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # validate_config wants the defaults merged in first (raw, it complains about cluster_synced_files)
    validate_config(prepare_config(config))
    # and the check bites: a resource count must be an integer
    broken = _config()
    broken["available_node_types"]["gpu"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_has_a_cpu_head_and_a_gpu_type_that_scales_from_zero():
    config = _config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 for t in gpu)


def test_cluster_yaml_pins_the_tested_versions():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.strip().partition("==")
        pins[name.lower()] = version
    setup = " ".join(_config()["setup_commands"])
    assert "-c ~/negprep/constraints.txt" in setup  # everything negprep needs, as tested together
    found = re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^\s'\";]*)", setup)
    assert {n.lower() for n, _ in found} >= {"torch", "ray"}
    for name, version in found:
        expect = "2.13.0" if name == "torch" else pins[name.lower()]  # torch: the Makefile's wheel
        assert version.split("+")[0] == expect, name
    # GPU nodes get torch's CUDA build, the others the CPU wheel: one command decides by nvidia-smi
    torch = next(c for c in _config()["setup_commands"] if "torch==" in c)
    assert "nvidia-smi" in torch and "torch==2.13.0+cu" in torch and "/whl/cpu torch==2.13.0;" in torch


@pytest.mark.parametrize("name", ["cluster-scifact.yaml", "cluster-100m.yaml"])
def test_scheduled_job_examples_are_valid_jobs(name):
    from negprep.config import load_job

    job = load_job(str(ROOT / "jobs" / name))
    assert job.output.startswith("s3://") and job.work_dir and job.ray.retries >= 3
