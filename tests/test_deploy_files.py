"""Static checks of the deployment files (docker/, cluster/, .dockerignore).

Fast, offline, no Docker: the files are parsed and cross-checked against the project itself
(version, Ray pin, CLI, entrypoint), so a version bump or a renamed option that is not carried
into the image and the cluster manifests fails here instead of on a cluster.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import qpacknet
from qpacknet.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"

IMAGE = "ghcr.io/qpacknet/qpacknet:0.1.0"
IMAGE_RE = re.compile(r"ghcr\.io/[\w./-]+:\w(?:[\w.-]*\w)?")


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _ray_pin() -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError("no exact ray pin (ray[...]==X.Y.Z) in pyproject.toml")


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path}: not a YAML mapping"
    return doc


def _walk(node: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a parsed YAML tree."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found.extend(_walk(v, key))
    elif isinstance(node, list):
        for v in node:
            found.extend(_walk(v, key))
    return found


def _cluster_yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# -- YAML and the image -------------------------------------------------------------------


def test_expected_files_exist_and_all_cluster_yaml_parses() -> None:
    for p in (DOCKERFILE, ROOT / "docker/README.md", ROOT / ".dockerignore", CLUSTER / "README.md"):
        assert p.is_file(), p
    files = _cluster_yaml_files()
    assert {LAUNCHER, RAYCLUSTER, RAYJOB} <= set(files)
    for p in files:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), p


def test_image_tag_is_the_package_version() -> None:
    version = _pyproject()["project"]["version"]
    assert qpacknet.__version__ == version
    assert IMAGE.rsplit(":", 1)[1] == version


def test_every_image_reference_is_the_project_image() -> None:
    refs: list[tuple[str, str]] = []
    structured: dict[str, int] = {}
    for p in _cluster_yaml_files():
        for doc in yaml.safe_load_all(p.read_text()):
            values = _walk(doc, "image")
            structured[p.name] = structured.get(p.name, 0) + len(values)
            refs += [(p.name, v) for v in values]
        # also image names written in comments or commands
        refs += [(p.name, m) for m in IMAGE_RE.findall(p.read_text())]
    for p in (ROOT / "docker/README.md", CLUSTER / "README.md"):
        refs += [(p.name, m) for m in IMAGE_RE.findall(p.read_text())]
    # launcher docker.image; head and worker containers of RayCluster and RayJob
    assert structured[LAUNCHER.name] >= 1
    assert structured[RAYCLUSTER.name] >= 2
    assert structured[RAYJOB.name] >= 2
    wrong = [(f, v) for f, v in refs if v != IMAGE]
    assert not wrong, f"image references other than {IMAGE}: {wrong}"


# -- Dockerfile, .dockerignore -------------------------------------------------------------


def test_dockerfile_base_is_ray_image_matching_the_ray_pin() -> None:
    froms = [args for instr, args in _dockerfile_instructions() if instr == "FROM"]
    assert len(froms) == 1, froms
    base = froms[0].split()[0]
    assert "ray-ml" not in base
    m = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py311-cu12\d+", base)
    assert m, f"FROM {base!r} is not rayproject/ray:<ray>-py311-cu12x"
    assert m.group("ray") == _ray_pin()


def test_dockerfile_installs_package_and_jobs() -> None:
    instr = _dockerfile_instructions()
    copied = {
        Path(src).as_posix().rstrip("/")
        for kind, args in instr
        if kind == "COPY"
        for src in [a for a in args.split() if not a.startswith("--")][:-1]
    }
    assert {"pyproject.toml", "README.md", "qpacknet", "jobs"} <= copied, copied
    runs = " ".join(args for kind, args in instr if kind == "RUN")
    assert re.search(r"pip install [^&;]*--no-cache-dir[^&;]* \.(\s|$)", runs), runs
    assert ("WORKDIR", "/app") in instr
    env = " ".join(args for kind, args in instr if kind == "ENV")
    assert re.search(r"QPACKNET_DATA[= ]/data\b", env), env
    assert re.search(r"mkdir -p[^&;]*/data", runs) and re.search(r"mkdir -p[^&;]*/outputs", runs)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: last matching pattern wins, `!` re-includes; a pattern that
    matches a directory excludes everything under it."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.removeprefix("!").strip("/")
        alts = {pat, pat.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, a) for p in prefixes for a in alts) or (
            pat.startswith("**/") and any(fnmatch.fnmatchcase(x, pat[3:]) for x in parts)
        ):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_local_state_out_but_not_the_sources() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "data/MNIST/raw/train-images-idx3-ubyte.gz",
        "runs/pmnist/results.json",
        "bench/out/x.json",
        "qpacknet/__pycache__/cli.cpython-311.pyc",
        "qpacknet.egg-info/PKG-INFO",
        ".pytest_cache/v/cache",
    ):
        assert _dockerignored(path, patterns), f"{path} would be sent to the Docker build"
    for path in ("pyproject.toml", "README.md", "qpacknet/cli.py", "jobs/run_scenario.py"):
        assert not _dockerignored(path, patterns), f"{path} is needed by docker/Dockerfile"


# -- KubeRay -------------------------------------------------------------------------------


def _gpu_limit(container: dict[str, Any]) -> float:
    return float(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == _ray_pin()
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert all(_gpu_limit(c) == 0 for c in head), "the head should not hold a GPU"
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        containers = g["template"]["spec"]["containers"]
        assert any(_gpu_limit(c) >= 1 for c in containers), f"{g['groupName']}: no nvidia.com/gpu"
        for c in containers:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["maxReplicas"] >= 2, "a GPU group that cannot grow spreads nothing"


def test_raycluster_has_gpu_worker_group() -> None:
    doc = _load(RAYCLUSTER)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(doc["spec"])


def test_rayjob_embeds_the_same_cluster_and_shuts_down() -> None:
    job = _load(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    assert job["spec"]["rayClusterSpec"] == _load(RAYCLUSTER)["spec"], (
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec"
    )


def test_rayjob_entrypoint_runs_an_existing_script_with_valid_arguments() -> None:
    argv = shlex.split(_load(RAYJOB)["spec"]["entrypoint"])
    assert argv[0] in {"python", "python3"}
    script, args = argv[1], argv[2:]
    assert script == "jobs/run_scenario.py"
    assert (ROOT / script).is_file()
    ns = _parser().parse_args(["run", *args])  # argparse exits (SystemExit) on bad arguments
    assert ns.command == "run"
    assert ns.preset == "pmnist"
    assert ns.data_dir == "/data"
    assert ns.out and ns.out.startswith("/outputs/")


def test_head_pod_mounts_data_and_outputs() -> None:
    for spec in (_load(RAYCLUSTER)["spec"], _load(RAYJOB)["spec"]["rayClusterSpec"]):
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        mounts = {m["mountPath"] for m in head["volumeMounts"]}
        assert {"/data", "/outputs"} <= mounts


# -- Ray cluster launcher ------------------------------------------------------------------


def test_launcher_config_has_autoscaling_gpu_workers() -> None:
    cfg = _load(LAUNCHER)
    assert cfg["docker"]["image"] == IMAGE
    types = cfg["available_node_types"]
    head_type = cfg["head_node_type"]
    assert head_type in types
    assert types[head_type].get("resources", {}).get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != head_type}
    assert workers
    for name, t in workers.items():
        assert t["resources"].get("GPU", 0) >= 1, f"{name}: no GPU resources"
        assert t.get("min_workers", 0) == 0, f"{name}: should scale from zero"
        assert t["max_workers"] >= 2
        assert t["max_workers"] <= cfg["max_workers"]


def test_launcher_start_commands() -> None:
    cfg = _load(LAUNCHER)
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert re.search(r"ray start --head\b.*--port=6379", head)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert "--head" not in worker


def test_launcher_config_passes_rays_own_schema() -> None:
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(_load(LAUNCHER))  # raises on unknown or mistyped fields
