"""The deployment artifacts under deploy/ agree with each other and with what the engine needs.

Parsed, not built: the Dockerfile by its instructions, the KubeRay manifests as YAML, the
cluster-launcher config against Ray's own schema, the RayJob entrypoint by our CLI parser.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_REGION")


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict:
    docs = [d for d in load(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def dockerfile() -> tuple[str, dict[str, str], list[tuple[str, str]]]:
    """(base image with ARG defaults substituted, ARG defaults, [(INSTRUCTION, args)])."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    steps = [tuple((ln.split(None, 1) + [""])[:2]) for ln in text.splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    steps = [(op.upper(), rest.strip()) for op, rest in steps]
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    base = next(rest for op, rest in steps if op == "FROM").split()[0]
    for name, value in args.items():
        base = base.replace("${%s}" % name, value).replace("$" + name, value)
    return base, args, steps


def cluster_specs() -> dict[str, dict]:
    return {"RayCluster": one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"],
            "RayJob": one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
            "RayJob train": one(KUBERAY / "rayjob-train.yaml", "RayJob")["spec"]["rayClusterSpec"]}


def pods(spec: dict) -> dict[str, dict]:
    """Pod specs of the head and of every worker group."""
    out = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for g in spec["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]["spec"]
    return out


def all_pods():
    return [(kind, name, pod) for kind, spec in cluster_specs().items() for name, pod in pods(spec).items()]


def gpu_group(spec: dict) -> dict:
    groups = [g for g in spec["workerGroupSpecs"]
              if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert len(groups) == 1
    return groups[0]


def test_every_yaml_parses_with_the_expected_kinds():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayjob-train.yaml",
        "kuberay/secret.example.yaml", "cluster-launcher/aws.yaml"}
    kinds = {f.name: [(d.get("apiVersion"), d.get("kind")) for d in load(f)] for f in files}
    assert kinds["raycluster.yaml"] == [("ray.io/v1", "RayCluster")]
    assert kinds["rayjob.yaml"] == kinds["rayjob-train.yaml"] == [("ray.io/v1", "RayJob")]
    assert sorted(kinds["secret.example.yaml"]) == [("v1", "ConfigMap"), ("v1", "Secret")]


def test_one_image_everywhere_and_ray_versions_agree():
    images = {c["image"] for _, _, pod in all_pods() for c in pod["containers"]}
    assert len(images) == 1, images
    image = images.pop()
    assert yaml.safe_load((DEPLOY / "cluster-launcher" / "aws.yaml").read_text())["docker"]["image"] == image

    from packaging.requirements import Requirement

    _, args, _ = dockerfile()
    ray_req = next(Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())
                   ["project"]["dependencies"] if r.startswith("ray"))
    assert ray_req.specifier.contains(args["RAY_VERSION"])
    for kind, spec in cluster_specs().items():
        assert spec["rayVersion"] == args["RAY_VERSION"], kind


def test_rayjob_entrypoint_is_a_label_command_our_cli_accepts():
    from engine.cli import build_parser

    job = one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["depth-engine", "label"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "label"
    assert args.ray_address == "auto"  # without it the engine would start a local Ray on the head
    assert args.json and args.batch_size == 16
    assert args.input.startswith("s3://") and "{000000..000999}" in args.input
    assert args.output.startswith("s3://") and args.output.endswith("/")
    assert args.teacher and args.sky
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and isinstance(job["backoffLimit"], int)


def test_rayjob_train_entrypoint_is_a_ray_train_command_our_cli_accepts():
    from engine.cli import build_parser

    job = one(KUBERAY / "rayjob-train.yaml", "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["depth-engine", "train-student"]
    args = build_parser().parse_args(argv[1:])
    assert args.ray and args.ray_address == "auto"
    # Pods share no disk: every rank reads the checkpoint on resume, so it lives in the bucket.
    assert args.out.startswith("s3://")
    assert all(url.startswith("s3://") for url in [*args.labeled, *args.pseudo])
    assert args.init == ["dinov2", "facebook/dinov2-large"] and args.frozen is None
    assert args.ray_workers is None     # one worker per GPU of the fixed-size group
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and isinstance(job["backoffLimit"], int)


def test_rayjob_cluster_is_the_raycluster():
    specs = cluster_specs()
    assert specs["RayJob"] == specs["RayJob train"] == specs["RayCluster"]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayJob train"])
def test_cpu_head_and_fixed_size_gpu_workers(kind):
    spec = cluster_specs()[kind]
    head = spec["headGroupSpec"]
    head_res = head["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in k for part in head_res.values() for k in part)
    assert head["rayStartParams"]["num-cpus"] == "0"
    g = gpu_group(spec)
    res = g["template"]["spec"]["containers"][0]["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == 1
    assert g["rayStartParams"]["num-gpus"] == "1"
    # The engine sizes its actor pool from the GPUs present at start: no autoscaling range.
    assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] >= 1


def env_sources(container: dict) -> dict[str, tuple]:
    out = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {})
        if "secretKeyRef" in ref:
            out[e["name"]] = ("Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
        elif "configMapKeyRef" in ref:
            out[e["name"]] = ("ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"])
        else:
            out[e["name"]] = ("value", e.get("value"))
    return out


def test_s3_settings_reach_head_and_workers_from_the_secret_and_configmap():
    secret = one(KUBERAY / "secret.example.yaml", "Secret")
    config = one(KUBERAY / "secret.example.yaml", "ConfigMap")
    assert set(CREDENTIALS) <= set(secret["stringData"])
    assert set(S3_SETTINGS) <= set(config["data"])
    seen = set()
    for kind, name, pod in all_pods():
        src = env_sources(pod["containers"][0])
        for var in CREDENTIALS:
            assert src.get(var) == ("Secret", secret["metadata"]["name"], var), (kind, name, var)
        for var in S3_SETTINGS:
            assert src.get(var) == ("ConfigMap", config["metadata"]["name"], var), (kind, name, var)
        seen.add(name)
    assert "head" in seen and len(seen) >= 2


def test_no_literal_secrets_in_cluster_manifests():
    for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", KUBERAY / "rayjob-train.yaml"):
        text = path.read_text()
        assert not re.search(r"\bA(KIA|SIA)[A-Z0-9]{16}\b", text), path.name
        assert all(d["kind"] not in ("Secret", "ConfigMap") for d in load(path))
    for kind, name, pod in all_pods():
        for c in pod["containers"]:
            for var, src in env_sources(c).items():
                if re.search(r"SECRET|KEY_ID|TOKEN|PASSWORD", var):
                    assert src[0] == "Secret", (kind, name, var)


def test_dev_shm_and_model_cache_are_mounted():
    _, _, steps = dockerfile()
    env = " ".join(rest for op, rest in steps if op == "ENV")
    cache_dirs = dict(re.findall(r"(HF_HOME|DEPTH_ENGINE_CACHE)=(\S+)", env))
    assert set(cache_dirs) == {"HF_HOME", "DEPTH_ENGINE_CACHE"}
    for kind, name, pod in all_pods():
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", (kind, name)
        for var, path in cache_dirs.items():
            assert any(path == p or path.startswith(p.rstrip("/") + "/") for p in mounts
                       if p != "/dev/shm"), (kind, name, var)


def test_cluster_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((DEPLOY / "cluster-launcher" / "aws.yaml").read_text())
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["node_config"]["InstanceType"] == "m5.2xlarge"
    (worker,) = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert worker["node_config"]["InstanceType"] == "g5.xlarge" and worker["resources"]["GPU"] == 1
    assert worker["min_workers"] == 0 and 1 <= worker["max_workers"] <= cfg["max_workers"]
    assert "IamInstanceProfile" in worker["node_config"]
    assert any(o.startswith("--env AWS_REGION=") for o in cfg["docker"]["run_options"])
    assert "AWS_SECRET_ACCESS_KEY" not in (DEPLOY / "cluster-launcher" / "aws.yaml").read_text()


def test_dockerfile_builds_on_cuda_and_installs_the_project_with_cuda_torch():
    base, _, steps = dockerfile()
    assert re.fullmatch(r"rayproject/ray:[\d.]+-py3\d+-(gpu|cu\d+)|nvidia/cuda:.+", base), base
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert re.search(r"pip install [^&;]*\s\"?\.(\[[a-z,]+\])?\"?(\s|$)", runs)   # the project, maybe with extras
    assert "torch.version.cuda" in runs  # the build fails on a CPU-only torch
    assert not re.search(r"whl/cpu|\+cpu|--index-url", runs)
    assert not any(op == "ENTRYPOINT" for op, _ in steps)  # KubeRay runs `ray start` itself


def test_dockerignore_keeps_what_pip_install_needs():
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    kept = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", project["project"]["readme"], *packages} <= kept
