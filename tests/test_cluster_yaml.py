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
    assert {n.lower() for n, _ in found} >= {"ray"}
    for name, version in found:
        assert version == pins[name.lower()], name
    # torch first, by the script `make install` runs (tests/test_install_torch.py checks its choices): GPU
    # nodes get the CUDA build for their driver, the others the CPU wheel; all with the same python3
    commands = [c for c in _config()["setup_commands"] if "install" in c]
    assert commands[0] == "python3 ~/negprep/scripts/install-torch.py --quiet -c ~/negprep/constraints.txt"
    assert all(c.startswith("python3 -m pip install ") for c in commands[1:])
    assert "torch" not in " ".join(commands[1:])


@pytest.mark.parametrize("name", ["cluster-scifact.yaml", "cluster-100m.yaml"])
def test_scheduled_job_examples_are_valid_jobs(name):
    from negprep.config import load_job

    job = load_job(str(ROOT / "jobs" / name))
    assert job.output.startswith("s3://") and job.work_dir and job.ray.retries >= 3
