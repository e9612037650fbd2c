"""The deployment files agree with Ray and with each other: ray_cluster.yaml passes the checks `ray up` itself
runs (Ray's JSON schema and validation functions, from the installed ray package), the Docker image is built
on the Ray version the package is tested with, and the KubeRay manifests use the same image and entry points
that exist in pipelines/."""

from __future__ import annotations

import copy
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
KUBERAY = REPO / "infra" / "kuberay"
MLFLOW_INFRA = REPO / "infra" / "mlflow"
OPERATIONS = REPO / "docs" / "operations.md"

# GPUs per instance, from AWS's instance type pages (an independent fact, not read from our files).
AWS_GPUS = {"p4d.24xlarge": 8, "p4de.24xlarge": 8, "p3.16xlarge": 8, "p3dn.24xlarge": 8, "p5.48xlarge": 8,
            "g5.xlarge": 1, "g5.2xlarge": 1, "g6.xlarge": 1, "m5.large": 0, "m5.xlarge": 0, "m5.2xlarge": 0,
            "m5.4xlarge": 0}
# What leaked credentials look like: access key ids, secret-key settings.
SECRET_PATTERNS = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"ASIA[0-9A-Z]{16}",
                                           r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}")]


def ray_up_checks(config: dict) -> dict:
    """The offline part of `ray up`'s _bootstrap_config: defaults, docker checks, then schema + validation."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def kuberay_docs() -> dict[str, list[dict]]:
    """file name -> its YAML documents."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(KUBERAY.glob("*.yaml"))}


def docker_from() -> tuple[str, str, str]:
    """(ray version, python tag, cuda tag) of the Dockerfile's FROM rayproject/ray:X.Y.Z-pyNN-cuNNN."""
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.M)
    assert len(froms) == 1, f"{DOCKERFILE}: expected one FROM, found {froms}"
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d+)", froms[0])
    assert m, f"{DOCKERFILE}: FROM {froms[0]} is not a CUDA Ray image tag (rayproject/ray:X.Y.Z-pyNN-cuNNN)"
    return m.group(1), f"{m.group(2)}.{m.group(3)}", m.group(4)


# ----------------------------------------------------------------------------- ray_cluster.yaml
def test_cluster_yaml_passes_rays_own_checks():
    prepared = ray_up_checks(load_cluster())
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert prepared["provider"]["type"] == "aws"
    assert types[head]["node_config"]["InstanceType"] in AWS_GPUS and AWS_GPUS[types[head]["node_config"]["InstanceType"]] == 0
    assert types[head]["resources"].get("CPU") == 0, "no training work may land on the head"
    workers = {name: t for name, t in types.items() if name != head}
    gpus = {name: AWS_GPUS[t["node_config"]["InstanceType"]] for name, t in workers.items()}
    assert 8 in gpus.values() and 1 in gpus.values(), gpus
    for name, t in workers.items():
        assert t["min_workers"] == 0 and 1 <= t["max_workers"] <= prepared["max_workers"], name
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    # the same setup on every node: the project installed from the mounted checkout
    assert any("pip install" in c and "-e" in c for c in prepared["setup_commands"])
    mount_target = next(k for k, v in prepared["file_mounts"].items() if Path(v).resolve() == Path(".").resolve()
                        or v == ".")
    assert any(mount_target in c for c in prepared["setup_commands"])
    assert prepared["docker"]["image"] and prepared["docker"]["container_name"]


def test_cluster_yaml_reaches_s3_by_instance_profile_and_holds_no_keys():
    cfg = load_cluster()
    for name, t in cfg["available_node_types"].items():
        assert "IamInstanceProfile" in t["node_config"], f"node type {name} has no IAM instance profile for S3"
    text = CLUSTER_YAML.read_text()
    for pat in SECRET_PATTERNS:
        assert not pat.search(text), f"{CLUSTER_YAML} holds what looks like a credential ({pat.pattern})"
    assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text


def _set(cfg: dict, path: str, value):
    *parents, last = path.split("/")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value


def _rename(cfg: dict, path: str, new_key: str):
    *parents, last = path.split("/")
    node = cfg
    for p in parents:
        node = node[p]
    node[new_key] = node.pop(last)


@pytest.mark.parametrize("mutate, error", [
    (lambda c: _rename(c, "idle_timeout_minutes", "idle_timeout_minute"), jsonschema.ValidationError),
    (lambda c: _rename(c, "available_node_types/gpu_8x_a100/max_workers", "max_worker"),
     jsonschema.ValidationError),
    (lambda c: _rename(c, "docker/image", "imgae"), AssertionError),  # Ray's docker check: no image
    (lambda c: _set(c, "max_workers", "ten"), jsonschema.ValidationError),
    (lambda c: _set(c, "available_node_types/gpu_1x_a10g/resources", {"GPU": -1}), jsonschema.ValidationError),
    (lambda c: _set(c, "available_node_types/gpu_1x_a10g/min_workers", 1.5), jsonschema.ValidationError),
    (lambda c: _set(c, "head_node_type", "heda"), ValueError),
    (lambda c: _set(c, "available_node_types/gpu_1x_a10g/min_workers", 11), ValueError),
], ids=["typo-top-level", "typo-node-type", "typo-docker", "max_workers-not-int", "negative-gpus",
        "fractional-min_workers", "unknown-head-type", "min-workers-over-global-max"])
def test_cluster_yaml_mistakes_fail_rays_checks(mutate, error):
    cfg = load_cluster()
    ray_up_checks(cfg)  # the file itself is fine ...
    mutate(cfg)
    with pytest.raises(error):  # ... and each mistake is caught by Ray's own checks
        ray_up_checks(cfg)


# ----------------------------------------------------------------------------- Docker image
def test_dockerfile_base_matches_tested_ray_and_python():
    ray_version, py, cuda = docker_from()
    installed = Version(ray.__version__)
    assert Version(ray_version).release[:2] == installed.release[:2], (
        f"{DOCKERFILE}: base image Ray {ray_version} but the package is tested with Ray {installed}")
    project = pyproject()["project"]
    ray_req = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray")
    assert ray_req.specifier.contains(ray_version), f"Ray {ray_version} violates pyproject's '{ray_req}'"
    assert {"train", "tune", "data"} <= ray_req.extras
    assert SpecifierSet(project["requires-python"]).contains(py)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == py, "image Python differs from the tested one"
    assert int(cuda[:2]) >= 12, "CUDA 12+ is needed for A100/A10G wheels of current torch"


def test_dockerfile_installs_the_project_from_pyproject():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.startswith("#")]
    copies = [ln for ln in lines if ln.startswith("COPY")]
    for ln in copies:  # every source exists in the build context (the repository root)
        srcs = [a for a in shlex.split(ln)[1:] if not a.startswith("--")][:-1]
        for s in srcs:
            assert (REPO / s).exists(), f"{DOCKERFILE}: '{ln}' copies {s}, which is not in the repository"
    first_pyproject = next(i for i, ln in enumerate(lines) if ln.startswith("COPY") and "pyproject.toml" in ln)
    first_pip = next(i for i, ln in enumerate(lines) if ln.startswith("RUN") and "pip install" in ln)
    assert first_pyproject < first_pip, "dependencies must be installed from the copied pyproject.toml"
    assert "pyproject.toml" in lines[first_pip], "the first pip install should read pyproject.toml's dependencies"
    project_install = [ln for ln in lines if ln.startswith("RUN") and re.search(r"pip install .*-e \.(\s|$)", ln)]
    assert project_install, f"{DOCKERFILE}: the project itself is never pip-installed"
    copied_pkgs = {shlex.split(ln)[-2] for ln in copies}
    assert {"magface", "pipelines", "configs"} <= copied_pkgs
    label = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', text)
    assert label and label.group(1) == pyproject()["project"]["version"]


def test_one_image_tag_everywhere():
    image = load_cluster()["docker"]["image"]
    name, tag = image.rsplit(":", 1)
    assert tag == pyproject()["project"]["version"], f"image tag {tag} != package version"
    assert re.search(rf"docker build -f infra/docker/Dockerfile -t {re.escape(image)} \.", DOCKERFILE.read_text())
    images = []
    for fname, docs in kuberay_docs().items():
        for d in docs:
            if d["kind"] == "RayCluster":
                spec = d["spec"]
                groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
                images += [(fname, c["image"]) for g in groups for c in g["template"]["spec"]["containers"]]
    assert images and all(img == image for _, img in images), images


# ----------------------------------------------------------------------------- KubeRay
def test_kuberay_raycluster_structure_matches_cluster_yaml():
    docs = [d for ds in kuberay_docs().values() for d in ds]
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(clusters) == 1
    rc = clusters[0]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    spec = rc["spec"]
    assert spec["rayVersion"] == docker_from()[0]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    cluster = load_cluster()
    launcher_gpus = sorted(AWS_GPUS[t["node_config"]["InstanceType"]]
                           for n, t in cluster["available_node_types"].items() if n != cluster["head_node_type"])
    kube_gpus = []
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and "rayStartParams" in g
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        (c,) = g["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        assert limits == c["resources"]["requests"], f"{g['groupName']}: requests must equal limits for GPUs"
        kube_gpus.append(int(limits["nvidia.com/gpu"]))
        node_type = g["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert AWS_GPUS[node_type] == kube_gpus[-1], f"{g['groupName']}: {node_type} has {AWS_GPUS[node_type]} GPUs"
    assert sorted(set(kube_gpus)) == sorted(set(launcher_gpus)), (kube_gpus, launcher_gpus)
    # S3 through a service account (IRSA), never keys
    sas = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert g["template"]["spec"]["serviceAccountName"] in sas
    for p in KUBERAY.glob("*.yaml"):
        for pat in SECRET_PATTERNS:
            assert not pat.search(p.read_text()), p


def entry_point(entrypoint: str) -> tuple[Path, list[str]]:
    """`python pipelines/x.py --config c.yaml ...` -> (pipelines/x.py, the argument list)."""
    argv = shlex.split(entrypoint)
    assert argv[0] in ("python", "python3"), entrypoint
    return Path(argv[1]), argv[2:]


def test_kuberay_rayjobs_run_existing_entry_points_on_that_cluster():
    docs = kuberay_docs()
    cluster_name = next(d["metadata"]["name"] for ds in docs.values() for d in ds if d["kind"] == "RayCluster")
    jobs = {f: d for f, ds in docs.items() for d in ds if d["kind"] == "RayJob"}
    assert "rayjob-train.yaml" in jobs
    for fname, job in jobs.items():
        assert job["apiVersion"] == "ray.io/v1", fname
        spec = job["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster_name}, fname
        script, args = entry_point(spec["entrypoint"])
        assert script.parts[0] == "pipelines" and (REPO / script).is_file(), f"{fname}: {script} does not exist"
        if "--config" in args:
            cfg = args[args.index("--config") + 1]
            assert (REPO / cfg).is_file(), f"{fname}: config {cfg} does not exist"
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert env["working_dir"] == next(iter(load_cluster()["file_mounts"])), "code location differs from the launcher's"
    script, args = entry_point(jobs["rayjob-train.yaml"]["spec"]["entrypoint"])
    assert script == Path("pipelines/train.py")
    # the arguments parse with the script's own parser and give a valid config (every --set key exists)
    import importlib.util

    from magface.config import Config

    spec = importlib.util.spec_from_file_location("train_entry", REPO / script)
    train_entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_entry)
    parsed = train_entry.parse_args(args)
    cfg = Config.load(REPO / parsed.config, parsed.set)
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8 and cfg.train.storage_path.startswith("s3://")


# ----------------------------------------------------------------------------- MLflow service + docs
def test_mlflow_compose_uses_postgres_and_s3_artifacts():
    compose = yaml.safe_load((MLFLOW_INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    cmd = services["mlflow"]["command"]
    assert cmd[:2] == ["mlflow", "server"]
    backend = cmd[cmd.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend
    assert "s3://" in cmd[cmd.index("--artifacts-destination") + 1]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    mlflow_pin = re.search(r'mlflow==(\d+\.\d+)', (MLFLOW_INFRA / "Dockerfile").read_text()).group(1)
    import mlflow

    assert Version(mlflow.__version__).release[:2] == Version(mlflow_pin).release[:2]
    for p in MLFLOW_INFRA.iterdir():
        for pat in SECRET_PATTERNS:
            assert not pat.search(p.read_text()), p


def test_operations_guide_commands_name_existing_files():
    text = OPERATIONS.read_text()
    scripts = set(re.findall(r"python (pipelines/\w+\.py)", text))
    assert {"pipelines/train.py", "pipelines/convert.py", "pipelines/evaluate.py"} <= scripts
    for s in scripts:
        assert (REPO / s).is_file(), f"{OPERATIONS} runs {s}, which does not exist"
    for cfg in set(re.findall(r"(configs/[\w.-]+\.yaml)", text)):
        assert (REPO / cfg).is_file(), f"{OPERATIONS} names {cfg}, which does not exist"
    for f in ("ray_cluster.yaml", "infra/docker/Dockerfile", "infra/kuberay/raycluster.yaml",
              "infra/mlflow/docker-compose.yml", "infra/mlflow/start_local.sh"):
        assert f in text and (REPO / f).exists(), f
    assert "ray up ray_cluster.yaml" in text and "ray down ray_cluster.yaml" in text
