"""Offline checks of deploy/: the KubeRay RayService, the core Service, the Serve config, the Dockerfile.

* RayService documents are validated against the CRD's openAPIV3Schema (from
  ../shared/kuberay, outside the repository) with unknown fields rejected, as
  `kubectl apply` (server-side strict field validation) would.
* Core kinds are validated with kubernetes-validate's bundled schemas in strict mode.
* The inline serveConfigV2 and deploy/serve_config.yaml are parsed by Ray Serve's own
  ServeDeploySchema, plus a check for keys it would silently ignore.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CRD_PATH = Path(__file__).resolve().parents[2] / "shared" / "kuberay" / "ray.io_rayservices.yaml"
K8S_VERSION = "1.30.0"

ROLES = ("base_large", "base_small", "ft_small", "ft_large", "ft_small_safe")
AUTOSCALED = {"base_large", "ft_small"}
IMPORT_PATH = "services.app:role_app"
IMAGE = "eft-router:latest"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB: libyaml when available


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return _load_all(DEPLOY / "rayservice.yaml")


@pytest.fixture(scope="module")
def rayservice(manifests) -> dict:
    found = [d for d in manifests if d.get("kind") == "RayService"]
    assert len(found) == 1, f"expected one RayService in deploy/rayservice.yaml, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def serve_file() -> dict:
    return yaml.load((DEPLOY / "serve_config.yaml").read_text(), Loader=Loader)


@pytest.fixture(scope="module")
def serve_inline(rayservice) -> dict:
    text = rayservice["spec"].get("serveConfigV2")
    assert isinstance(text, str) and text.strip(), "spec.serveConfigV2 must be a non-empty YAML string"
    return yaml.load(text, Loader=Loader)


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    """The RayService v1 openAPIV3Schema as the CRD states it (unknown fields allowed)."""
    if not CRD_PATH.exists():
        pytest.skip(f"RayService CRD schema not found at {CRD_PATH} (kept outside the repository, in shared/kuberay)")
    crd = yaml.load(CRD_PATH.read_text(), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == "RayService"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def crd_validator(crd_schema) -> jsonschema.protocols.Validator:
    schema = strict_schema(crd_schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# --------------------------------------------------------------------------- helpers


def strict_schema(node):
    """An OpenAPI v3 (structural) schema as JSON Schema that rejects unknown fields.

    Walks schema positions only (properties, items, additionalProperties, allOf/anyOf/oneOf,
    not), so a field that happens to be called "properties" is never mistaken for a keyword.
    * an object schema with `properties` and neither `additionalProperties` nor
      `x-kubernetes-preserve-unknown-fields: true` gets `additionalProperties: false`;
    * `x-kubernetes-int-or-string: true` becomes `type: [integer, string]` (any `anyOf` of
      the two that controller-gen emits beside it is dropped; `pattern` applies to strings);
    * `nullable: true` adds "null" to the type.
    """
    if isinstance(node, bool) or not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in out:
        out["properties"] = {name: strict_schema(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), (dict, bool)):
            out[key] = strict_schema(out[key])
    if isinstance(out.get("items"), list):
        out["items"] = [strict_schema(sub) for sub in out["items"]]
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if out.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_errors(validator, doc: dict) -> list[str]:
    return sorted(
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)
    )


def group_custom_resources(group: dict) -> dict[str, float]:
    """Custom Ray resources a KubeRay head/worker group offers.

    rayStartParams.resources is pasted into the `ray start` shell command, hence KubeRay's
    convention of a quoted, escaped JSON string ('"{\\"large_node\\": 1}"'); newer KubeRay
    also has a group-level `resources` map of quantities.
    """
    offered: dict[str, float] = {}
    raw = (group.get("rayStartParams") or {}).get("resources")
    if raw:
        text = raw.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        offered.update({k: float(v) for k, v in json.loads(text.replace('\\"', '"')).items()})
    for name, quantity in (group.get("resources") or {}).items():
        if name.lower() not in ("cpu", "gpu", "memory"):
            offered[name] = float(quantity)
    return offered


def cpu_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def unknown_serve_keys(config: dict) -> list[str]:
    """Keys ServeDeploySchema would silently ignore (it allows extra fields by design)."""

    def check(raw: dict, model, where: str) -> list[str]:
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        return [f"{where}.{key}" for key in raw if key not in known]

    bad = check(config, ServeDeploySchema, "<config>")
    bad += check(config.get("http_options") or {}, HTTPOptionsSchema, "http_options")
    for app in config.get("applications") or []:
        where = f"applications[{app.get('name')}]"
        bad += check(app, ServeApplicationSchema, where)
        for dep in app.get("deployments") or []:
            dwhere = f"{where}.deployments[{dep.get('name')}]"
            bad += check(dep, DeploymentSchema, dwhere)
            bad += check(dep.get("ray_actor_options") or {}, RayActorOptionsSchema, f"{dwhere}.ray_actor_options")
            bad += check(dep.get("autoscaling_config") or {}, AutoscalingConfig, f"{dwhere}.autoscaling_config")
    return bad


def _groups(rayservice: dict) -> tuple[dict, list[dict]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return cluster["headGroupSpec"], cluster["workerGroupSpecs"]


def _containers(rayservice: dict):
    head, workers = _groups(rayservice)
    for group in [head, *workers]:
        yield from group["template"]["spec"]["containers"]


# --------------------------------------------------------------------------- RayService vs the CRD


def test_rayservice_documents_match_the_crd(manifests, crd_validator):
    docs = [d for d in manifests if d.get("kind") == "RayService"]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert crd_errors(crd_validator, doc) == []


def test_crd_validation_rejects_unknown_and_misspelled_fields(rayservice, crd_schema, crd_validator):
    typo = copy.deepcopy(rayservice)
    typo["spec"]["serveConfigV2Typo"] = typo["spec"]["serveConfigV2"]
    errors = crd_errors(crd_validator, typo)
    assert errors and any("serveConfigV2Typo" in e for e in errors), errors
    # The schema as written would have let it through: the strictness is ours.
    assert crd_errors(jsonschema.Draft7Validator(crd_schema), typo) == []

    container = copy.deepcopy(rayservice)
    head = container["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["imagePullPolicyy"] = head.pop("imagePullPolicy")
    errors = crd_errors(crd_validator, container)
    assert any("imagePullPolicyy" in e for e in errors), errors

    port = copy.deepcopy(rayservice)
    worker = port["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["ports"][0]["containerPortt"] = worker["ports"][0].pop("containerPort")
    errors = crd_errors(crd_validator, port)
    assert any("containerPortt" in e for e in errors), errors  # unknown field and missing required one

    group = copy.deepcopy(rayservice)
    group["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in crd_errors(crd_validator, group))


def test_crd_int_or_string_accepts_both_and_nothing_else(rayservice, crd_validator):
    doc = copy.deepcopy(rayservice)
    limits = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 4
    assert crd_errors(crd_validator, doc) == []
    limits["cpu"] = "4"
    assert crd_errors(crd_validator, doc) == []
    limits["cpu"] = [4]
    assert crd_errors(crd_validator, doc)


# --------------------------------------------------------------------------- core kinds


def test_core_manifests_validate_strictly(manifests):
    core = [d for d in manifests if not d["apiVersion"].startswith("ray.io/")]
    kinds = sorted(d["kind"] for d in core)
    assert kinds == ["Service"], kinds
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    typo = copy.deepcopy(core[0])
    typo["spec"]["clusterIp"] = "None"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_grpc_service_targets_the_head_pod(manifests, rayservice):
    (svc,) = [d for d in manifests if d.get("kind") == "Service"]
    spec = svc["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    (port,) = [p for p in spec["ports"] if p["port"] == 50051]
    selector = spec["selector"]
    assert selector.get("ray.io/node-type") == "head"  # KubeRay's label: head pods only
    head, _ = _groups(rayservice)
    head_labels = head["template"].get("metadata", {}).get("labels", {})
    for key, value in selector.items():  # the rest must come from the head pod template
        if not key.startswith("ray.io/"):
            assert head_labels.get(key) == value, f"selector {key}={value} is not on the head pod template"
    head_ports = {p.get("name"): p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    target = port.get("targetPort", port["port"])
    assert (head_ports.get(target) if isinstance(target, str) else target) == 50051
    assert 50051 in head_ports.values()


# --------------------------------------------------------------------------- cluster shape


def test_rayservice_cluster_shape(rayservice):
    head, workers = _groups(rayservice)
    assert rayservice["spec"]["rayClusterConfig"].get("rayVersion") == "2.60.0"
    assert {w["groupName"] for w in workers} == {"large-nodes", "small-nodes"}
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 8000, 50051} <= head_ports
    assert not set(group_custom_resources(head)) & {"large_node", "small_node"}, "no role replica on the head"
    for group in workers:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        # KubeRay's readiness probe of RayService workers checks the Serve proxy on port "serve".
        ports = {p.get("name"): p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports.get("serve") == 8000
    for container in _containers(rayservice):
        assert container["image"] == IMAGE
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("EFT_CACHE_DIR") == "/models"
        res = container["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])


def test_group_custom_resources_parser():
    assert group_custom_resources({"rayStartParams": {"resources": '"{\\"large_node\\": 1}"'}}) == {"large_node": 1.0}
    assert group_custom_resources({"rayStartParams": {"resources": "'{\"a\": 2}'"}}) == {"a": 2.0}
    assert group_custom_resources({"resources": {"cpu": "4", "small_node": "1"}}) == {"small_node": 1.0}
    assert group_custom_resources({}) == {}


# --------------------------------------------------------------------------- Serve configs


@pytest.mark.parametrize("which", ["serve_file", "serve_inline"])
def test_serve_configs_parse_with_serve_schema(which, request):
    raw = request.getfixturevalue(which)
    config = ServeDeploySchema.model_validate(raw)
    assert unknown_serve_keys(raw) == []
    assert sorted(app.name for app in config.applications) == sorted(f"eft-{role}" for role in ROLES)
    for app in config.applications:
        role = app.name.removeprefix("eft-")
        assert app.import_path == IMPORT_PATH
        assert app.route_prefix is None
        assert app.args == {
            "role": role,
            "model": f"/models/family/{role}",
            "dtype": "float32",
            "max_cached_tokens": 65536,
        }
        (dep,) = app.deployments
        assert dep.name == "RoleDeployment"
        fields = dep.model_fields_set
        assert "max_ongoing_requests" in fields and "ray_actor_options" in fields
        actor = dep.ray_actor_options
        assert actor.num_cpus and actor.num_cpus > 0
        node = "large_node" if role.endswith("_large") else "small_node"
        assert set(actor.resources) == {node}, (role, actor)
        if role in AUTOSCALED:
            auto = dep.autoscaling_config
            assert "num_replicas" not in fields and auto
            assert 1 <= auto["min_replicas"] <= auto.get("initial_replicas", auto["min_replicas"]) <= auto["max_replicas"]
            assert auto["max_replicas"] > auto["min_replicas"] and auto["target_ongoing_requests"] > 0
            assert auto["target_ongoing_requests"] <= dep.max_ongoing_requests
        else:
            assert "num_replicas" in fields and "autoscaling_config" not in fields


def test_role_app_builds_every_application(serve_file):
    """The args in the config are the ones services.app:role_app accepts (no Ray needed)."""
    from ray.serve import Application

    from services.app import role_app

    for app in serve_file["applications"]:
        assert isinstance(role_app(app["args"]), Application), app["name"]


def test_unknown_serve_keys_are_caught(serve_file):
    typo = copy.deepcopy(serve_file)
    typo["applications"][0]["deployments"][0]["max_ongoing_request"] = 4
    typo["applications"][1]["deployments"][0]["ray_actor_options"]["num_cpu"] = 1
    ServeDeploySchema.model_validate(typo)  # Serve itself ignores both
    assert len(unknown_serve_keys(typo)) == 2


def test_inline_serve_config_lists_the_same_applications(serve_file, serve_inline):
    by_name = lambda cfg: {app["name"]: app for app in cfg["applications"]}  # noqa: E731
    assert by_name(serve_inline) == by_name(serve_file)
    assert len(serve_inline["applications"]) == len(by_name(serve_inline))
    for key in ("proxy_location", "http_options"):
        assert serve_inline.get(key) == serve_file.get(key), key


def test_deployment_resources_exist_in_a_worker_group(serve_inline, rayservice):
    _, workers = _groups(rayservice)
    offered = {
        w["groupName"]: (group_custom_resources(w), cpu_quantity(w["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]))
        for w in workers
    }
    for app in serve_inline["applications"]:
        for dep in app["deployments"]:
            opts = dep["ray_actor_options"]
            wanted = opts.get("resources") or {}
            assert wanted, f"{app['name']} is not pinned to a node group"
            fits = [
                name
                for name, (res, cpus) in offered.items()
                if all(res.get(k, 0) >= v for k, v in wanted.items()) and cpus >= opts.get("num_cpus", 1)
            ]
            assert fits, f"{app['name']} asks for {wanted} and {opts.get('num_cpus')} CPUs; groups offer {offered}"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), " ".join(rest.split())))
    return out


def test_dockerfile_pins_torch_and_installs_the_lock():
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [arg for op, arg in instructions if op == "RUN"]

    def first(pattern: str) -> int:
        hits = [i for i, arg in enumerate(runs) if re.search(pattern, arg)]
        assert hits, f"no RUN matches {pattern!r}"
        return hits[0]

    lock_pin = re.search(r"^torch==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert lock_pin, "requirements.lock has no torch pin"
    torch_run = first(r"pip install .*torch==")
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cpu\b", runs[torch_run])
    assert re.search(rf"\btorch=={re.escape(lock_pin.group(1))}(\s|$)", runs[torch_run])
    lock_run = first(r"pip install (.* )?-r requirements\.lock")
    project_run = first(r"pip install (.* )?--no-deps \.(\s|$)")
    family_run = first(r"eft family build")
    assert torch_run < lock_run < project_run < family_run
    assert re.search(r"ln -s\S* .*/models/family\b", runs[family_run])
    assert any(op == "COPY" and "requirements.lock" in arg for op, arg in instructions)
    assert any(op == "ENV" and re.search(r"\bEFT_CACHE_DIR=/models\b", arg) for op, arg in instructions)
    exposed = {p.split("/")[0] for op, arg in instructions if op == "EXPOSE" for p in arg.split()}
    assert {"8000", "50051"} <= exposed
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
