"""models.yaml's ``ray:`` block (inferd.scale.config) and ``inferd ray deploy`` refusing bad input before Ray starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from inferd.scale.config import ScaleSpec, parse_size, scale_spec
from inferd.supervisor.config import ConfigError, config_from_dict, load_config
from tests.helpers import inferd_env


def _spec(ray: object) -> ScaleSpec:
    cfg = config_from_dict({"models": [{"name": "m", "backend": "llama-cpp", "ray": ray}]})
    return scale_spec(cfg.models[0])


def test_fixed_replicas_and_resources() -> None:
    spec = _spec({"num_replicas": 2, "num_cpus": 1.5, "memory": "512MiB", "max_ongoing_requests": 8,
                  "health_check_period_s": 1, "health_check_timeout_s": 20})
    assert spec.deployment_options() == {
        "num_replicas": 2,
        "ray_actor_options": {"num_cpus": 1.5, "memory": 512 * 1024**2},
        "max_ongoing_requests": 8,
        "health_check_period_s": 1.0,
        "health_check_timeout_s": 20.0,
    }


def test_autoscaling_and_defaults() -> None:
    spec = _spec({"autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3,
                                  "initial_replicas": 2}})
    opts = spec.deployment_options()
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3.0,
                                          "initial_replicas": 2}
    assert _spec(None).deployment_options()["num_replicas"] == 1  # no block: one replica, 1 CPU
    assert _spec(None).deployment_options()["ray_actor_options"] == {"num_cpus": 1.0}


@pytest.mark.parametrize("ray, key", [
    ({"replicas": 2}, "unknown key(s) replicas"),
    ({"num_replicas": 0}, "num_replicas: must be 1-1024"),
    ({"num_replicas": 10**9}, "num_replicas: must be 1-1024"),
    ({"num_replicas": True}, "num_replicas: expected an integer"),
    ({"num_replicas": "two"}, "num_replicas: expected an integer"),
    ({"num_replicas": 2, "autoscaling": {}}, "not both"),
    ({"num_cpus": float("nan")}, "num_cpus: must be between"),
    ({"num_cpus": -1}, "num_cpus: must be between"),
    ({"num_cpus": "lots"}, "num_cpus: expected a number"),
    ({"memory": "12 parsecs"}, "memory: expected bytes"),
    ({"memory": "9999999GiB"}, "larger than 1 PiB"),
    ({"autoscaling": 3}, "autoscaling: must be a mapping"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas (2) < min_replicas (3)"),
    ({"autoscaling": {"max": 2}}, "autoscaling: unknown key(s) max"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}}, "initial_replicas: must be 1-2"),
    ({"health_check_period_s": 0}, "health_check_period_s: must be between"),
])
def test_bad_blocks_name_the_key(ray: dict, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _spec(ray)
    assert "model 'm': ray" in str(exc.value) and key in str(exc.value)


def test_ray_block_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\].ray: must be a mapping"):
        config_from_dict({"models": [{"name": "m", "backend": "llama-cpp", "ray": [1]}]})


def test_sizes() -> None:
    assert parse_size(1024, "x") == 1024
    assert parse_size("1GiB", "x") == 1024**3
    assert parse_size("1.5 MB", "x") == 1_500_000
    with pytest.raises(ConfigError):
        parse_size(True, "x")


def test_supervisor_reads_the_same_file(tmp_path) -> None:
    """One models.yaml for `inferd up` and `inferd ray deploy`: the supervisor carries the block."""
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - name: m\n    backend: llama-cpp\n    ray: {num_replicas: 3}\n")
    cfg = load_config(path)
    assert cfg.models[0].ray == {"num_replicas": 3}


def test_deploy_refuses_a_bad_block_before_starting_ray(tmp_path) -> None:
    pytest.importorskip("ray")
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - name: m\n    backend: llama-cpp\n    ray: {num_replicas: 0}\n")
    out = subprocess.run([sys.executable, "-m", "inferd.cli", "ray", "deploy", str(path)],
                         capture_output=True, text=True, env=inferd_env(RAY_USAGE_STATS_ENABLED="0"), timeout=60)
    assert out.returncode == 2
    assert "model 'm': ray.num_replicas: must be 1-1024" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout
    bad_port = subprocess.run([sys.executable, "-m", "inferd.cli", "ray", "deploy", str(path), "--grpc-port", "0"],
                              capture_output=True, text=True, env=inferd_env(), timeout=60)
    assert bad_port.returncode == 2 and "--grpc-port: must be 1-65535" in bad_port.stderr
