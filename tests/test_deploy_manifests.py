"""Offline checks of deploy/: the KubeRay RayService, the core Service, the Serve config, the Dockerfile.

* RayService documents are validated against the CRD's openAPIV3Schema (from
  ../shared/kuberay, outside the repository) with unknown fields rejected, as
  `kubectl apply` (server-side strict field validation) would.
* Core kinds are validated with kubernetes-validate's bundled schemas in strict mode.
* The inline serveConfigV2 and deploy/serve_config.yaml are parsed by Ray Serve's own
  ServeDeploySchema, plus a check for keys it would silently ignore; both equal what
  deploy/ensemble.yaml (the router's ensemble config, validated by EnsembleConfig) generates.
* The router sidecar of the head pod: command (run through the real CLI parser), ports,
  Ray token env, the shared /tmp/ray, termination timing, and no pod-readiness probes.
* deploy/wait_for_roles.py (the sidecar's entry point) against a fake dashboard.
* The Dockerfile: install order, the generated gRPC code, the files the manifests name.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

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

from services.config import EnsembleConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CRD_PATH = Path(__file__).resolve().parents[2] / "shared" / "kuberay" / "ray.io_rayservices.yaml"
K8S_VERSION = "1.30.0"

ROLES = ("base_large", "base_small", "ft_small", "ft_large", "ft_small_safe")
AUTOSCALED = {"base_large", "ft_small"}
IMPORT_PATH = "services.app:role_app"
IMAGE = "eft-router:latest"
ROUTER = "eft-router"  # the router sidecar's container name
APP = "/app"  # the image's WORKDIR: /app/deploy/... in commands is deploy/... here
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
def ensemble() -> EnsembleConfig:
    return EnsembleConfig.from_yaml(DEPLOY / "ensemble.yaml")


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


def _head_container(rayservice: dict, name: str) -> dict:
    head, _ = _groups(rayservice)
    (container,) = [c for c in head["template"]["spec"]["containers"] if c["name"] == name]
    return container


def _ports(container: dict) -> dict[str, int]:
    return {p.get("name"): p["containerPort"] for p in container.get("ports", [])}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _prestop_sleep(container: dict) -> float:
    """Seconds the container's preStop hook sleeps before anything else."""
    command = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    found = re.search(r"\bsleep (\d+(?:\.\d+)?)", command)
    assert found, f"{container['name']}: preStop does not sleep: {command}"
    return float(found.group(1))


def _local(path: str) -> str:
    """A path inside the image (/app/...) as the same file in this checkout."""
    return str(ROOT / path[len(APP) + 1 :]) if path.startswith(APP + "/") else path


def _eft_serve_call(argv: list[str], monkeypatch) -> dict:
    """Run `eft ARGV` through the real CLI with the launcher replaced: what it would serve."""
    from eft_router import cli

    calls = []
    fake = SimpleNamespace(serve_forever=lambda config, backend, address, deploy_roles: calls.append(
        dict(config=config, backend=backend, address=address, deploy_roles=deploy_roles)
    ))
    monkeypatch.setattr(cli, "_launch", lambda: fake)
    cli.main([_local(a) for a in argv])
    (call,) = calls
    return call


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


def test_grpc_service_targets_the_router_sidecar(manifests, rayservice, ensemble):
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
    containers = head["template"]["spec"]["containers"]
    named = [name for c in containers for name in _ports(c) if name]
    assert len(named) == len(set(named)), f"port names must be unique in the pod: {named}"

    def resolve(target) -> tuple[str, int]:
        (hit,) = [(c["name"], n) for c in containers for name, n in _ports(c).items() if target in (name, n)]
        return hit

    router = ensemble.router
    wanted = {router.port: router.port, 8080: router.http_port, 9090: router.metrics_port}
    assert {p["port"] for p in spec["ports"]} == set(wanted)  # gRPC, OpenAI HTTP, metrics
    for p in spec["ports"]:  # each one reaches the router sidecar's port of that config field
        assert resolve(p.get("targetPort", p["port"])) == (ROUTER, wanted[p["port"]])


# --------------------------------------------------------------------------- cluster shape


def test_rayservice_cluster_shape(rayservice):
    head, workers = _groups(rayservice)
    assert rayservice["spec"]["rayClusterConfig"].get("rayVersion") == "2.60.0"
    assert {w["groupName"] for w in workers} == {"large-nodes", "small-nodes"}
    ray_head = head["template"]["spec"]["containers"][0]
    assert ray_head["name"] == "ray-head"  # KubeRay: the first container is the Ray container
    assert {6379, 8265, 8000} <= set(_ports(ray_head).values())
    assert 50051 not in _ports(ray_head).values(), "the gRPC port belongs to the router sidecar"
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
def test_serve_configs_parse_with_serve_schema(which, request, ensemble):
    raw = request.getfixturevalue(which)
    config = ServeDeploySchema.model_validate(raw)
    assert unknown_serve_keys(raw) == []
    assert sorted(app.name for app in config.applications) == sorted(f"eft-{role}" for role in ROLES)
    for app in config.applications:
        role = app.name.removeprefix("eft-")
        assert app.import_path == IMPORT_PATH
        assert app.route_prefix is None
        assert app.args["model"] == f"/models/family/{role}"
        assert app.args == ensemble.app_args(role)
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


# --------------------------------------------------------------------------- the ensemble config


def test_ensemble_config_is_valid_for_the_router(ensemble):
    assert list(ensemble.roles) == list(ROLES)
    assert ensemble.drafter == "ft_small"
    for role, rc in ensemble.roles.items():
        assert rc.model == f"/models/family/{role}"  # the image's /models/family symlink
    assert ensemble.tokenizer_path() == "/models/family/ft_small"
    router = ensemble.router
    assert (router.host, router.port) == ("0.0.0.0", 50051)  # reachable from outside the container
    assert router.metrics_port and router.metrics_port != router.port
    # Nothing that names a file: the config must validate in any container, and TLS and
    # tokens come from the environment (Secrets) instead.
    assert router.tls is None and router.auth_token_file is None and router.tokens() == []
    assert router.with_env({}).tokens() == []
    assert router.with_env({"EFT_AUTH_TOKENS": "tok-a, tok-b"}).tokens() == ["tok-a", "tok-b"]
    # the OpenAI-compatible API: on its own port, which the environment can move or turn off
    assert router.http_port == 8080 and router.http_port not in (router.port, router.metrics_port)
    assert router.with_env({"EFT_HTTP_PORT": "9000"}).http_port == 9000
    assert router.with_env({"EFT_HTTP_PORT": "0"}).http_port == 0  # 0: no HTTP API


def test_serve_config_is_what_the_ensemble_config_generates(serve_file, ensemble):
    """serve_config.yaml = EnsembleConfig(...).to_serve_config() + the proxy options, so
    `serve deploy deploy/serve_config.yaml` and `eft serve --deploy` deploy the same roles
    (and serveConfigV2 equals serve_config.yaml, checked above)."""
    generated = ensemble.to_serve_config()
    assert set(serve_file) == set(generated) | {"proxy_location", "http_options"}
    assert [a["name"] for a in serve_file["applications"]] == [a["name"] for a in generated["applications"]]
    assert serve_file["applications"] == generated["applications"]


def test_every_replica_runs_throughput_optimized_without_direct_ingress(ensemble):
    """Autoscaled or not, every role's replicas get Serve's throughput settings without
    direct ingress (which hides handle calls from the autoscaler and makes each replica's
    shutdown run out Serve's 20 s timeout) and with room for replies over 4 MiB; a user's
    own variables are kept, and win."""
    own = {"runtime_env": {"env_vars": {"MY_FLAG": "x", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}}}
    for role, rc in ensemble.roles.items():
        env = rc.deployment_options()["ray_actor_options"]["runtime_env"]["env_vars"]
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0", (role, env)
        assert env["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"] == str(2**31 - 1), (role, env)  # replies over 4 MiB
        custom = rc.model_copy(update={"ray_actor_options": rc.ray_actor_options.model_validate({**rc.ray_actor_options.to_dict(), **own})})
        env = custom.deployment_options()["ray_actor_options"]["runtime_env"]["env_vars"]
        assert env["MY_FLAG"] == "x" and env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert any(rc.autoscaling_config for rc in ensemble.roles.values()) and not all(rc.autoscaling_config for rc in ensemble.roles.values())


def test_serve_config_agreement_check_catches_a_drift(serve_file, ensemble):
    drifted = ensemble.model_copy(deep=True)
    drifted.roles["ft_small"].kv_cache_bytes = 1 << 20
    assert drifted.to_serve_config()["applications"] != serve_file["applications"]


# --------------------------------------------------------------------------- the router sidecar


def test_router_sidecar_runs_eft_serve_on_the_head(rayservice, ensemble, monkeypatch):
    router = _head_container(rayservice, ROUTER)
    assert router["image"] == _head_container(rayservice, "ray-head")["image"] == IMAGE
    command = router["command"] + router.get("args", [])
    assert command[:2] == ["python", f"{APP}/deploy/wait_for_roles.py"]
    cut = command.index("--")
    waiter, serve = command[2:cut], command[cut + 1 :]
    assert waiter == ["--config", f"{APP}/deploy/ensemble.yaml"]
    assert serve[0] == "eft"

    call = _eft_serve_call(serve[1:], monkeypatch)
    assert call["backend"] == "serve"
    assert call["address"] == "127.0.0.1:6379"  # the head's GCS, same pod network
    assert call["deploy_roles"] is False  # KubeRay deploys the roles from serveConfigV2
    assert call["config"].roles == ensemble.roles and call["config"].router == ensemble.router

    ports = _ports(router)
    assert ports == {"grpc": ensemble.router.port, "openai-http": ensemble.router.http_port, "router-metrics": ensemble.router.metrics_port}
    res = router["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and res["requests"] == res["limits"]
    env = _env(router)
    assert env["OMP_NUM_THREADS"]["value"] == str(int(cpu_quantity(res["limits"]["cpu"])))


def test_router_sidecar_has_no_probe_that_gates_the_head_pod(rayservice):
    """KubeRay deploys serveConfigV2 (and keeps talking to the dashboard) only while the head
    pod is Ready, and a pod is Ready only when every container is. The router reports
    SERVING only once the roles answer, so a readiness (or startup) probe on it would keep
    the roles from ever being deployed; a liveness probe would restart it during that wait.
    """
    router = _head_container(rayservice, ROUTER)
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert probe not in router, f"{ROUTER}.{probe}: see this test's docstring"


def test_router_sidecar_gets_the_ray_cluster_token(rayservice):
    """KubeRay injects RAY_AUTH_MODE/RAY_AUTH_TOKEN into the Ray container (index 0) only, from
    the Secret authOptions.secretName names: the sidecar gets the same env from the same Secret."""
    auth = rayservice["spec"]["rayClusterConfig"]["authOptions"]
    assert auth["mode"] == "token" and auth.get("secretName")
    env = _env(_head_container(rayservice, ROUTER))
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": auth["secretName"], "key": "auth_token"}  # KubeRay's key; required
    users = env["EFT_AUTH_TOKENS"]["valueFrom"]["secretKeyRef"]
    assert users["optional"] is True and users["name"] != auth["secretName"]


def test_router_sidecar_shares_the_ray_temp_dir(rayservice):
    """A driver on the head node connects to the raylet and object store over unix sockets
    in the head's session dir (/tmp/ray/session_*/sockets)."""
    head, _ = _groups(rayservice)
    volumes = {v["name"]: v for v in head["template"]["spec"].get("volumes", [])}
    mounts = {}
    for name in ("ray-head", ROUTER):
        (mount,) = [m for m in _head_container(rayservice, name).get("volumeMounts", []) if m["mountPath"] == "/tmp/ray"]
        mounts[name] = mount["name"]
    assert mounts["ray-head"] == mounts[ROUTER] == "ray-logs"  # KubeRay's name: its autoscaler joins it
    assert "emptyDir" in volumes["ray-logs"]


def test_termination_lets_the_router_drain_before_ray_stops(rayservice, ensemble):
    head, _ = _groups(rayservice)
    grace = head["template"]["spec"]["terminationGracePeriodSeconds"]
    router_done = _prestop_sleep(_head_container(rayservice, ROUTER)) + ensemble.router.grace_s
    ray_head = _head_container(rayservice, "ray-head")
    ray_stop = _prestop_sleep(ray_head)
    assert "ray stop" in " ".join(ray_head["lifecycle"]["preStop"]["exec"]["command"])
    assert router_done < ray_stop < grace, (router_done, ray_stop, grace)


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
    assert {"8000", "50051", "8080"} <= exposed
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def _copied_to_app() -> dict[str, str]:
    """Image path -> source path of every file or folder the Dockerfile COPYs into /app."""
    copied = {}
    for op, arg in _dockerfile_instructions():
        if op != "COPY" or arg.startswith("--"):
            continue
        *sources, dest = arg.split()
        base = APP + "/" + dest.removeprefix("./").rstrip("/") if dest not in (".", "./") else APP
        for src in sources:
            target = f"{base}/{Path(src).name}" if dest.endswith("/") or dest in (".", "./") else base
            copied[target.rstrip("/")] = src
    return copied


def test_dockerfile_builds_the_grpc_code_from_the_proto():
    instructions = _dockerfile_instructions()
    runs = [(i, arg) for i, (op, arg) in enumerate(instructions) if op == "RUN"]
    (install,) = [(i, arg) for i, arg in runs if re.search(r"pip install (.* )?--no-deps \.(\s|$)", arg)]
    copied_before = {
        src for op, arg in instructions[: install[0]] if op == "COPY" for src in arg.split()[:-1]
    }
    # setup.py's build_py hook runs protoc on proto/; pyproject names the build requirements.
    assert {"pyproject.toml", "setup.py", "proto", "eft_router", "services"} <= copied_before
    assert "--no-build-isolation" not in install[1]  # pip fetches setuptools + grpcio-tools
    check = install[1].split("pip install", 1)[1]
    assert re.search(r"from eft_router\.api import .*eft_pb2_grpc", check)
    assert re.search(r"\bcd /(\s|$)", check), "import check must not run from /app (the source tree)"
    build_requires = re.search(r"^requires = (.*)$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert "grpcio-tools" in build_requires and "setuptools" in build_requires


def test_files_the_commands_name_are_in_the_image(rayservice):
    copied = _copied_to_app()
    cmd = [arg for op, arg in _dockerfile_instructions() if op == "CMD"]
    texts = [" ".join(c.get("command", []) + c.get("args", [])) for c in _containers(rayservice)] + cmd
    named = {m for text in texts for m in re.findall(r"/app/[\w./-]+", text)}
    assert f"{APP}/deploy/ensemble.yaml" in named and f"{APP}/deploy/wait_for_roles.py" in named
    for path in sorted(named):
        assert path in copied, f"{path} is used but not COPYed into the image (COPYs: {sorted(copied)})"
        assert Path(_local(path)).exists(), path


def test_dockerfile_default_command_deploys_and_serves(ensemble, monkeypatch):
    (cmd,) = [arg for op, arg in _dockerfile_instructions() if op == "CMD"]
    argv = json.loads(cmd)
    assert argv[:2] == ["bash", "-c"]
    script = argv[2]
    steps = [s.strip() for s in script.split("&&")]
    head = [s for s in steps if s.startswith("ray start")]
    assert head and "--head" in head[0]
    resources = json.loads(re.search(r"--resources='([^']*)'", head[0]).group(1))
    wanted = {k for rc in ensemble.roles.values() for k in (rc.ray_actor_options.resources or {})}
    assert wanted <= set(resources), "one node must offer every node group's resource"
    (serve,) = [s for s in steps if s.startswith("exec eft serve")]  # exec: the router gets SIGTERM
    call = _eft_serve_call(shlex.split(serve)[2:], monkeypatch)
    assert (call["backend"], call["address"], call["deploy_roles"]) == ("serve", "auto", True)
    assert call["config"].roles == ensemble.roles


# --------------------------------------------------------------------------- deploy/wait_for_roles.py


@pytest.fixture(scope="module")
def waiter():
    spec = importlib.util.spec_from_file_location("wait_for_roles", DEPLOY / "wait_for_roles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def dashboard():
    """A fake Ray dashboard: GET /api/serve/applications/ answers `state["apps"]` (name ->
    status), or `state["code"]`; records the Authorization headers it saw."""
    state = {"apps": {}, "code": 200, "auth": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            state["auth"].append(self.headers.get("Authorization"))
            if self.path != "/api/serve/applications/":
                self.send_error(404)
                return
            if state["code"] != 200:
                self.send_error(state["code"])
                return
            body = json.dumps({"applications": {n: {"name": n, "status": s} for n, s in state["apps"].items()}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_port}"
    yield state
    server.shutdown()
    server.server_close()


def test_waiter_names_the_ensemble_applications(waiter, serve_file):
    assert waiter.app_names(str(DEPLOY / "ensemble.yaml")) == [a["name"] for a in serve_file["applications"]]


def test_waiter_polls_until_every_role_runs(waiter):
    replies = iter([
        ConnectionRefusedError("dashboard not up"),
        {},
        {"eft-a": "DEPLOYING"},
        {"eft-a": "DEPLOYING"},
        {"eft-a": "RUNNING", "eft-b": "DEPLOYING", "other": "DEPLOY_FAILED"},
        {"eft-a": "RUNNING", "eft-b": "RUNNING", "other": "DEPLOY_FAILED"},
    ])

    def fetch():
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    lines, sleeps = [], []
    waiter.wait_for(["eft-a", "eft-b"], fetch, interval_s=2, log=lines.append, sleep=sleeps.append)
    assert sleeps == [2] * 5
    assert lines[0].startswith("waiting for role applications: dashboard=unreachable (ConnectionRefusedError")
    assert lines[1:] == [
        "waiting for role applications: eft-a=NOT_DEPLOYED, eft-b=NOT_DEPLOYED",
        "waiting for role applications: eft-a=DEPLOYING, eft-b=NOT_DEPLOYED",  # logged once, not per poll
        "waiting for role applications: eft-b=DEPLOYING",
        "all 2 role applications are RUNNING",
    ]


def test_waiter_times_out_and_stops_on_a_refused_token(waiter):
    now = [0.0]

    def sleep(s):
        now[0] += s

    with pytest.raises(TimeoutError, match="eft-a=DEPLOYING"):
        waiter.wait_for(["eft-a"], lambda: {"eft-a": "DEPLOYING"}, 1, timeout_s=5, log=lambda _: None, sleep=sleep, clock=lambda: now[0])
    assert now[0] == 5

    def refused():
        raise waiter.AuthRefused("no")

    with pytest.raises(waiter.AuthRefused):
        waiter.wait_for(["eft-a"], refused, 1, log=lambda _: None, sleep=lambda _: None)


def test_waiter_reads_the_dashboard_with_the_ray_token(waiter, dashboard):
    dashboard["apps"] = {"eft-a": "RUNNING"}
    assert waiter.fetch_statuses(dashboard["url"], "tok") == {"eft-a": "RUNNING"}
    assert waiter.fetch_statuses(dashboard["url"] + "/", None) == {"eft-a": "RUNNING"}
    assert dashboard["auth"] == ["Bearer tok", None]
    for code in (401, 403):
        dashboard["code"] = code
        with pytest.raises(waiter.AuthRefused, match=f"HTTP {code}"):
            waiter.fetch_statuses(dashboard["url"], "wrong")
    dashboard["code"] = 503
    with pytest.raises(Exception):  # retried by wait_for, like an unreachable dashboard
        waiter.fetch_statuses(dashboard["url"], "tok")


def test_waiter_main_execs_the_command_once_the_roles_run(waiter, dashboard, serve_file, monkeypatch, capsys):
    dashboard["apps"] = {a["name"]: "RUNNING" for a in serve_file["applications"]}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "cluster-token")
    execs = []
    monkeypatch.setattr(waiter.os, "execvp", lambda file, argv: execs.append((file, argv)))
    monkeypatch.setattr(waiter.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM alone
    config = str(DEPLOY / "ensemble.yaml")
    argv = ["--config", config, "--dashboard", dashboard["url"], "--", "eft", "serve", "--config", config]
    assert waiter.main(argv) == 0  # execvp is faked: it returns
    assert execs == [("eft", ["eft", "serve", "--config", config])]
    assert dashboard["auth"] == ["Bearer cluster-token"]
    assert "all 5 role applications are RUNNING" in capsys.readouterr().out

    dashboard["code"] = 401
    assert waiter.main(["--config", config, "--dashboard", dashboard["url"], "--", "true"]) == 1
    assert len(execs) == 1
