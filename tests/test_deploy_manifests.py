"""deploy/kubernetes and deploy/compose: schema-valid, complete, consistent, and llmd accepts
their configs.

Kubernetes objects are checked against the API's OpenAPI schemas (kubernetes-validate, strict:
unknown fields fail); custom resources against the openAPIV3Schema of their published CRDs
(tests/data/crds, see its README.md), made strict the way the API server prunes; the compose
file against the compose-spec JSON schema (tests/data/compose).

`python tests/test_deploy_manifests.py` rewrites deploy/kubernetes/base/prometheusrule.yaml from
etc/prometheus/llmd-rules.yml.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
BASE = K8S / "base"
COMPOSE = ROOT / "deploy" / "compose"
DATA = Path(__file__).resolve().parent / "data"
RULES = ROOT / "etc" / "prometheus" / "llmd-rules.yml"

# The Kubernetes API the core objects are validated against (a schema kubernetes-validate ships).
KUBERNETES_VERSION = "1.33.0"

# CRD file per (group, kind) of the custom resources the manifests use.
CRD_FILES = {
    (
        "inference.networking.k8s.io",
        "InferencePool",
    ): "inference.networking.k8s.io_inferencepools.yaml",
    ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
CLUSTER_SCOPED = {"Namespace", "PriorityClass"}
NAMESPACE = "llmd"

BASE_OBJECTS = sorted(
    [
        ("ConfigMap", "llmd-config"),
        ("ConfigMap", "llmd-epp-config"),
        ("DaemonSet", "llmd"),
        ("Deployment", "llmd-epp"),
        ("InferencePool", "llmd"),
        ("Namespace", "llmd"),
        ("PriorityClass", "llmd-node-critical"),
        ("PriorityClass", "llmd-router"),
        ("PrometheusRule", "llmd"),
        ("Role", "llmd-epp"),
        ("RoleBinding", "llmd-epp"),
        ("Service", "llmd"),
        ("Service", "llmd-epp"),
        ("ServiceAccount", "llmd-epp"),
        ("ServiceMonitor", "llmd"),
    ]
)
SCALING_OBJECTS = sorted(
    [o for o in BASE_OBJECTS if o != ("DaemonSet", "llmd")]
    + [("Deployment", "llmd"), ("PodDisruptionBudget", "llmd"), ("ScaledObject", "llmd")]
)

# The endpoint picker's metric mapping for pods labelled llm-d.ai/engine-type=llmd.
LLMD_ENGINE = {
    "name": "llmd",
    "queuedRequestsSpec": "llmd_node_requests_waiting",
    "runningRequestsSpec": "llmd_node_requests_running",
    "kvUsageSpec": "llmd_node_cache_usage_ratio",
    "loraSpec": "llmd_node_models_info",
}
# Plugin types the EPP config may use: each checked in llm-d-router (v0.10.0) by its README or
# factory under pkg/epp/framework/plugins/.
EPP_PLUGIN_TYPES = {
    "metrics-data-source",
    "core-metrics-extractor",
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "lora-affinity-scorer",
    "max-score-picker",
}


# -- reading the kustomizations --------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomize(directory: Path, files: set[Path] | None = None) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` yields (before its transformers), read here so
    that the checks run where kubectl is not installed; every file read is added to files."""
    kfile = directory / "kustomization.yaml"
    (k,) = load_yaml_docs(kfile)
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"{kfile}: teach kustomize() in this test about {sorted(unknown)}"
    if files is not None:
        files.add(kfile)
    objects: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{kfile}: resource {entry} does not exist"
        if path.is_dir():
            objects += kustomize(path, files)
        else:
            objects += load_yaml_docs(path)
            if files is not None:
                files.add(path)
    for p in k.get("patches", []):
        patch = yaml.safe_load(p["patch"])
        assert patch.pop("$patch", None) == "delete", f"{kfile}: only $patch: delete is read here"
        before = len(objects)
        objects = [o for o in objects if ident(o) != ident(patch)]
        assert len(objects) == before - 1, f"{kfile}: the patch deletes no object: {ident(patch)}"
    return objects


def ident(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata", {})
    return obj["apiVersion"], obj["kind"], meta.get("name", ""), meta.get("namespace", "")


def kinds(objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects)


def by_kind(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize(K8S)


@pytest.fixture(scope="module")
def scaling() -> list[dict[str, Any]]:
    return kustomize(K8S / "scaling")


# -- validators ------------------------------------------------------------------------------------


def structural(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as plain JSON Schema, as strict as the API server.

    x-kubernetes-int-or-string becomes anyOf integer/string; nullable allows null; an object
    with properties and without x-kubernetes-preserve-unknown-fields gets
    additionalProperties: false (the API server drops such fields, and rejects them under
    strict field validation); an embedded resource also allows apiVersion, kind, metadata.
    CEL rules (x-kubernetes-validations) are not evaluated."""
    if isinstance(schema, list):
        return [structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: structural(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    if schema.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_validator(group: str, kind: str, version: str) -> jsonschema.Draft4Validator:
    (crd,) = load_yaml_docs(DATA / "crds" / CRD_FILES[(group, kind)])
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind}: {version} is not served by the CRD (only {list(served)})"
    # OpenAPI v3.0 schemas are close to draft 4 (exclusiveMinimum etc. as booleans).
    return jsonschema.Draft4Validator(structural(served[version]["schema"]["openAPIV3Schema"]))


def validate(obj: dict[str, Any]) -> None:
    """Raise when obj is not an object the API server would accept (as far as schemas tell)."""
    meta = obj.get("metadata") or {}
    assert meta.get("name"), f"{obj.get('kind')}: metadata.name is missing"
    if obj["kind"] not in CLUSTER_SCOPED:
        assert meta.get("namespace") == NAMESPACE, f"{obj['kind']} {meta['name']}: namespace"
    group, _, version = obj["apiVersion"].rpartition("/")
    if (group, obj["kind"]) in CRD_FILES:
        crd_validator(group, obj["kind"], version).validate(obj)
        # The CRD leaves metadata open; check it as any object's metadata.
        wrapper = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
        kubernetes_validate.validate(wrapper, KUBERNETES_VERSION, strict=True)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def describe(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('name')}"


# -- the kustomizations are complete ---------------------------------------------------------------


def test_every_file_is_in_a_kustomization() -> None:
    """Every YAML file under deploy/kubernetes is read by a kustomization, and every resource
    a kustomization lists exists (kustomize() asserts that)."""
    files: set[Path] = set()
    kustomize(K8S, files)
    kustomize(K8S / "scaling", files)
    present = {p.resolve() for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml")}
    assert sorted(present - files) == []


def test_base_has_the_expected_objects(base: list[dict[str, Any]]) -> None:
    """The base kustomization yields exactly the expected objects."""
    assert kinds(base) == BASE_OBJECTS


def test_scaling_swaps_the_daemonset_for_a_scaled_deployment(scaling: list[dict[str, Any]]) -> None:
    """scaling/ is the base without the DaemonSet, plus a Deployment, its PDB and ScaledObject."""
    assert kinds(scaling) == SCALING_OBJECTS


# -- every object is schema-valid ------------------------------------------------------------------


ALL_OBJECTS = [(K8S, kind, name) for kind, name in BASE_OBJECTS] + [
    (K8S / "scaling", kind, name)
    for kind, name in SCALING_OBJECTS
    if (kind, name) not in BASE_OBJECTS
]


@pytest.mark.parametrize(
    ("directory", "kind", "name"), ALL_OBJECTS, ids=[f"{k}/{n}" for _, k, n in ALL_OBJECTS]
)
def test_object_is_valid(directory: Path, kind: str, name: str) -> None:
    """Each object validates against its Kubernetes schema or its CRD's schema."""
    validate(by_kind(kustomize(directory), kind, name))


def test_kubernetes_version_is_shipped() -> None:
    """The schema version named above is one kubernetes-validate has (strict variant included)."""
    assert KUBERNETES_VERSION in all_versions()


def test_core_validator_catches_a_misspelled_field(base: list[dict[str, Any]]) -> None:
    """A misspelled field in the DaemonSet fails strict validation."""
    ds = copy.deepcopy(by_kind(base, "DaemonSet", "llmd"))
    pod = ds["spec"]["template"]["spec"]
    pod["nodeSelecter"] = pod.pop("nodeSelector")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(ds)


def test_crd_validator_catches_a_wrong_type(base: list[dict[str, Any]]) -> None:
    """A target port given as a string fails the InferencePool's schema."""
    pool = copy.deepcopy(by_kind(base, "InferencePool", "llmd"))
    pool["spec"]["targetPorts"][0]["number"] = "11434"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'integer'"):
        validate(pool)


def test_crd_validator_catches_an_unknown_field(scaling: list[dict[str, Any]]) -> None:
    """An unknown field (HPA's name for min replicas) fails the ScaledObject's schema."""
    so = copy.deepcopy(by_kind(scaling, "ScaledObject", "llmd"))
    so["spec"]["minReplicas"] = 1
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        validate(so)


def test_metadata_is_checked(base: list[dict[str, Any]]) -> None:
    """A custom resource without a namespace, or with a misspelled metadata field, fails."""
    pool = copy.deepcopy(by_kind(base, "InferencePool", "llmd"))
    del pool["metadata"]["namespace"]
    with pytest.raises(AssertionError, match="namespace"):
        validate(pool)
    monitor = copy.deepcopy(by_kind(base, "ServiceMonitor", "llmd"))
    monitor["metadata"]["label"] = monitor["metadata"].pop("labels")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(monitor)


def test_int_or_string_accepts_both() -> None:
    """structural() keeps int-or-string fields open to integers and strings only."""
    v = jsonschema.Draft4Validator(
        structural({"type": "object", "properties": {"p": {"x-kubernetes-int-or-string": True}}})
    )
    v.validate({"p": 1})
    v.validate({"p": "http"})
    with pytest.raises(jsonschema.ValidationError):
        v.validate({"p": 1.5})
    with pytest.raises(jsonschema.ValidationError):
        v.validate({"q": 1})


def cel_rules(schema: Any) -> list[str]:
    if isinstance(schema, list):
        return [r for s in schema for r in cel_rules(s)]
    if not isinstance(schema, dict):
        return []
    own = [v["rule"] for v in schema.get("x-kubernetes-validations", [])]
    return own + [
        r for k, v in schema.items() if k != "x-kubernetes-validations" for r in cel_rules(v)
    ]


def test_crd_cel_rules_hold(base: list[dict[str, Any]], scaling: list[dict[str, Any]]) -> None:
    """structural() cannot evaluate CEL: the CRDs' rules are these, checked here by hand."""
    rules = {
        f: cel_rules(load_yaml_docs(DATA / "crds" / f)[0]) for f in sorted(set(CRD_FILES.values()))
    }
    assert {f: len(r) for f, r in rules.items()} == {
        "inference.networking.k8s.io_inferencepools.yaml": 2,
        "keda.sh_scaledobjects.yaml": 1,
        "monitoring.coreos.com_prometheusrules.yaml": 0,
        "monitoring.coreos.com_servicemonitors.yaml": 0,
    }, "a CRD's CEL rules changed: check the new ones below"
    pool = by_kind(base, "InferencePool", "llmd")["spec"]
    # self.kind != 'Service' || has(self.port)
    ref = pool["endpointPickerRef"]
    assert ref.get("kind", "Service") != "Service" or "port" in ref
    # targetPorts: port numbers unique
    numbers = [p["number"] for p in pool["targetPorts"]]
    assert len(numbers) == len(set(numbers))
    # minReplicaCount <= maxReplicaCount (100 when unset)
    so = by_kind(scaling, "ScaledObject", "llmd")["spec"]
    assert so.get("minReplicaCount", 0) <= so.get("maxReplicaCount", 100)


# -- kubectl kustomize (where kubectl is installed) ------------------------------------------------


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (Debian 12's kubernetes-client 1.20 is too old)")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


@pytest.mark.parametrize(
    ("directory", "expected"), [(K8S, BASE_OBJECTS), (K8S / "scaling", SCALING_OBJECTS)]
)
def test_kubectl_kustomize_renders_valid_objects(
    directory: Path, expected: list[tuple[str, str]]
) -> None:
    """kubectl kustomize renders the same objects, valid, with the images unchanged."""
    objects = render(directory)
    assert kinds(objects) == expected
    for obj in objects:
        validate(obj)
    images = {
        c["image"]
        for o in objects
        if o["kind"] in ("DaemonSet", "Deployment")
        for c in o["spec"]["template"]["spec"].get("initContainers", [])
        + o["spec"]["template"]["spec"]["containers"]
    }
    assert images <= {"llmd:0.1.0", "llm-d-router-endpoint-picker:v0.10.0"}


# -- the objects agree with each other and with llmd -----------------------------------------------


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod_spec(obj)["containers"] if c["name"] == name]
    (c,) = found
    return c


def test_deployment_pod_template_is_the_daemonsets(
    base: list[dict[str, Any]], scaling: list[dict[str, Any]]
) -> None:
    """scaling/deployment.yaml runs the very pod of daemonset.yaml."""
    ds = by_kind(base, "DaemonSet", "llmd")
    deploy = by_kind(scaling, "Deployment", "llmd")
    assert deploy["spec"]["template"] == ds["spec"]["template"]
    assert deploy["spec"]["selector"] == ds["spec"]["selector"]
    assert "replicas" not in deploy["spec"]  # KEDA owns it


def test_selectors_match_the_llmd_pods(
    base: list[dict[str, Any]], scaling: list[dict[str, Any]]
) -> None:
    """The Service, InferencePool, ServiceMonitor and PDB select the llmd pods, and the pods
    carry the engine label the picker's engineConfigs entry is named after."""
    labels = by_kind(base, "DaemonSet", "llmd")["spec"]["template"]["metadata"]["labels"]
    assert labels["llm-d.ai/engine-type"] == LLMD_ENGINE["name"]
    assert labels["app.kubernetes.io/name"] == "llmd"
    selectors = [
        by_kind(base, "Service", "llmd")["spec"]["selector"],
        by_kind(base, "InferencePool", "llmd")["spec"]["selector"]["matchLabels"],
        by_kind(base, "ServiceMonitor", "llmd")["spec"]["selector"]["matchLabels"],
        by_kind(scaling, "PodDisruptionBudget", "llmd")["spec"]["selector"]["matchLabels"],
    ]
    for sel in selectors:
        assert sel.items() <= labels.items()
    # The ServiceMonitor selects the Service by the Service's labels, and scrapes its named port.
    svc = by_kind(base, "Service", "llmd")
    assert selectors[2].items() <= svc["metadata"]["labels"].items()
    assert by_kind(base, "ServiceMonitor", "llmd")["spec"]["endpoints"][0]["port"] == "http"
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]
    # The picker's pods are not llmd pods.
    epp_labels = by_kind(base, "Deployment", "llmd-epp")["spec"]["template"]["metadata"]["labels"]
    assert not selectors[0].items() <= epp_labels.items()


def test_llmd_pod(base: list[dict[str, Any]]) -> None:
    """The llmd container: GPU limit, port 11434, probes on llmd's own endpoints, keys from
    the Secret, non-root with a read-only root, config and state mounted."""
    ds = by_kind(base, "DaemonSet", "llmd")
    spec = pod_spec(ds)
    c = container(ds, "llmd")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["args"] == ["--config", "/etc/llmd/llmd.toml"]
    assert c["ports"] == [{"name": "http", "containerPort": 11434, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # Liveness on /, which llmd answers itself, never on a child's health.
    assert c["livenessProbe"]["httpGet"] == {"path": "/", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert set(env) == {"LLMD_API_KEYS", "LLMD_INFERENCE_KEYS"}
    assert {r["name"] for r in env.values()} == {"llmd-keys"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    # The Containerfile's llmd user.
    assert spec["securityContext"]["runAsUser"] == 11434
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {
        "/etc/llmd": "config",
        "/var/lib/llmd": "data",
        "/run/llmd": "run",
        "/tmp": "tmp",
    }
    assert spec["priorityClassName"] == "llmd-node-critical"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1


def llmd_toml() -> str:
    (cm,) = [o for o in load_yaml_docs(BASE / "configmap.yaml") if o["kind"] == "ConfigMap"]
    text: str = cm["data"]["llmd.toml"]
    return text


def test_llmd_config_matches_the_pod(base: list[dict[str, Any]]) -> None:
    """llmd.toml listens on the container port, keeps state and the admin socket on the pod's
    writable mounts, serves /metrics without a key, and preloads its models; its backends fit
    the pod's GPU limit."""
    cfg = tomllib.loads(llmd_toml())
    assert cfg["proxy"]["listen"] == "0.0.0.0:11434"
    assert cfg["proxy"]["open_metrics"] is True
    assert cfg["daemon"]["state_dir"] == "/var/lib/llmd"
    assert cfg["daemon"]["admin_socket"].startswith("/run/llmd/")
    gpus = container(by_kind(base, "DaemonSet", "llmd"), "llmd")["resources"]["limits"]
    used = sorted(g for b in cfg["backend"] for g in b["gpus"])
    assert used == list(range(gpus["nvidia.com/gpu"]))
    for b in cfg["backend"]:
        assert b["env"]["OLLAMA_MODELS"] == "/var/lib/llmd/models"
    assert [m["name"] for m in cfg["model"]] == ["qwen2.5-coder:7b", "llama3.1:8b", "mistral:7b"]
    assert all(m["preload"] for m in cfg["model"])


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    # The keys come from the environment in both deployments (a Secret; compose's .env).
    env = dict(
        os.environ, LLMD_API_KEYS="deploy-test-key-1", LLMD_INFERENCE_KEYS="deploy-test-key-2"
    )
    return subprocess.run(
        [sys.executable, "-m", "llmd.daemon", "--check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_configmap_llmd_toml_passes_check_config(tmp_path: Path) -> None:
    """llmd --check-config accepts the ConfigMap's llmd.toml (keys from LLMD_API_KEYS)."""
    path = tmp_path / "llmd.toml"
    path.write_text(llmd_toml(), encoding="utf-8")
    out = check_config(path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_llmd_toml_passes_check_config() -> None:
    """llmd --check-config accepts deploy/compose/llmd.toml (keys from LLMD_API_KEYS)."""
    out = check_config(COMPOSE / "llmd.toml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_pull_script_is_the_same_in_both_deployments() -> None:
    """The init container's pull-models.sh is deploy/compose/pull-models.sh, and sh parses it."""
    (cm,) = [o for o in load_yaml_docs(BASE / "configmap.yaml") if o["kind"] == "ConfigMap"]
    script = COMPOSE / "pull-models.sh"
    assert cm["data"]["pull-models.sh"] == script.read_text(encoding="utf-8")
    out = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


FAKE_OLLAMA = """#!/bin/sh
# serve runs until killed; show knows the models listed in $STORE/present; pull records.
case "$1" in
serve) exec sleep 60 ;;
list) exit 0 ;;
show) grep -qx "$2" "$STORE/present" ;;
pull) echo "$2" >> "$STORE/pulled" ;;
*) exit 2 ;;
esac
"""


def test_pull_script_pulls_only_missing_models(tmp_path: Path) -> None:
    """pull-models.sh creates the model store, pulls each [[model]] of the config that
    `ollama show` does not know, in the config's order, and leaves present ones alone."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ollama"
    fake.write_text(FAKE_OLLAMA, encoding="utf-8")
    fake.chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)
    (tmp_path / "present").write_text("llama3.1:8b\n", encoding="utf-8")
    config = tmp_path / "llmd.toml"
    config.write_text(llmd_toml(), encoding="utf-8")
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        STORE=str(tmp_path),
        OLLAMA_MODELS=str(tmp_path / "models"),
    )
    out = subprocess.run(
        ["sh", str(COMPOSE / "pull-models.sh"), str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    pulled = (tmp_path / "pulled").read_text(encoding="utf-8").split()
    assert pulled == ["qwen2.5-coder:7b", "mistral:7b"]
    assert "llama3.1:8b is present" in out.stdout
    assert (tmp_path / "models").is_dir()


def test_endpoint_picker_config(base: list[dict[str, Any]]) -> None:
    """The EPP config maps llmd's metrics, uses known plugins, and every reference resolves;
    the picker serves the pool that names it."""
    cm = by_kind(base, "ConfigMap", "llmd-epp-config")
    (cfg,) = yaml.safe_load_all(cm["data"]["epp-config.yaml"])
    assert cfg["apiVersion"] == "llm-d.ai/v1alpha1"
    assert cfg["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in cfg["plugins"]}
    assert {p["type"] for p in plugins.values()} <= EPP_PLUGIN_TYPES
    refs = [p["pluginRef"] for prof in cfg["schedulingProfiles"] for p in prof["plugins"]]
    for src in cfg["dataLayer"]["sources"]:
        refs += [src["pluginRef"]] + [e["pluginRef"] for e in src["extractors"]]
    assert set(refs) <= set(plugins)
    extractor = plugins["core-metrics-extractor"]["parameters"]
    assert extractor["engineConfigs"] == [LLMD_ENGINE]
    assert extractor["defaultEngine"] == LLMD_ENGINE["name"]
    scorers = [p["pluginRef"] for p in cfg["schedulingProfiles"][0]["plugins"]]
    assert set(scorers) == EPP_PLUGIN_TYPES - {"metrics-data-source", "core-metrics-extractor"}

    # The pool points at the picker's Service, and the picker at the pool and its config.
    pool = by_kind(base, "InferencePool", "llmd")
    ref = pool["spec"]["endpointPickerRef"]
    svc = by_kind(base, "Service", "llmd-epp")
    assert ref["name"] == svc["metadata"]["name"]
    assert ref["port"]["number"] in [p["port"] for p in svc["spec"]["ports"]]
    epp = by_kind(base, "Deployment", "llmd-epp")
    args = container(epp, "epp")["args"]
    assert f"--pool-name={pool['metadata']['name']}" in args
    assert f"--pool-namespace={pool['metadata']['namespace']}" in args
    (config_file,) = [a.split("=", 1)[1] for a in args if a.startswith("--config-file=")]
    mount = container(epp, "epp")["volumeMounts"][0]
    assert config_file == f"{mount['mountPath']}/epp-config.yaml"
    assert pod_spec(epp)["serviceAccountName"] == "llmd-epp"
    assert pool["spec"]["targetPorts"] == [{"number": 11434}]


def test_epp_may_watch_pods_and_pools(base: list[dict[str, Any]]) -> None:
    """The picker's Role lets it read pods and inferencepools, and is bound to its account."""
    role = by_kind(base, "Role", "llmd-epp")
    granted = {
        (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted
    for rule in role["rules"]:
        assert set(rule["verbs"]) == {"get", "list", "watch"}
    binding = by_kind(base, "RoleBinding", "llmd-epp")
    assert binding["roleRef"]["name"] == "llmd-epp"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "llmd-epp", "namespace": "llmd"}
    ]


def test_scaled_object_scales_the_deployment_on_the_queue(scaling: list[dict[str, Any]]) -> None:
    """KEDA scales the llmd Deployment on llmd's waiting-requests gauge, about 5 per replica."""
    so = by_kind(scaling, "ScaledObject", "llmd")
    assert so["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "llmd",
    }
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "llmd_node_requests_waiting" in trigger["metadata"]["query"]
    assert trigger["metadata"]["threshold"] == "5"
    assert 1 <= so["spec"]["minReplicaCount"] < so["spec"]["maxReplicaCount"]


def test_no_registry_hosts_in_image_names() -> None:
    """Images are named without a registry; the operator sets one in kustomization images."""
    for path in K8S.rglob("*.yaml"):
        for obj in load_yaml_docs(path):
            if obj.get("kind") in ("DaemonSet", "Deployment"):
                spec = pod_spec(obj)
                for c in spec.get("initContainers", []) + spec["containers"]:
                    assert "/" not in c["image"], f"{path}: {c['image']}"
    (k,) = load_yaml_docs(BASE / "kustomization.yaml")
    assert all("/" not in i["newName"] for i in k["images"])


# -- the PrometheusRule carries llmd's alerting rules ----------------------------------------------

PROMETHEUSRULE_HEADER = """\
# llmd's alerting rules for prometheus-operator: the groups of etc/prometheus/llmd-rules.yml,
# copied verbatim with their comments. Do not edit here: edit that file and run
# `python tests/test_deploy_manifests.py`, which rewrites this one (a test fails while they
# differ). Your Prometheus must select it (its ruleSelector, e.g. a `release` label).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: llmd
  namespace: llmd
  labels:
    app.kubernetes.io/name: llmd
spec:
"""


def prometheusrule_text() -> str:
    """deploy/kubernetes/base/prometheusrule.yaml as made from etc/prometheus/llmd-rules.yml."""
    lines = RULES.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "".join(f"  {line}" if line.strip() else line for line in lines[start:])
    return PROMETHEUSRULE_HEADER + body


def test_prometheusrule_has_the_rules_files_groups(base: list[dict[str, Any]]) -> None:
    """The PrometheusRule's groups equal those of etc/prometheus/llmd-rules.yml, and the file is
    exactly what `python tests/test_deploy_manifests.py` writes."""
    with open(RULES, encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    assert by_kind(base, "PrometheusRule", "llmd")["spec"]["groups"] == rules["groups"]
    shipped = (BASE / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert shipped == prometheusrule_text(), "run: python tests/test_deploy_manifests.py"


# -- compose ---------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    with open(COMPOSE / "compose.yaml", encoding="utf-8") as f:
        doc: dict[str, Any] = yaml.safe_load(f)
    return doc


def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((DATA / "compose" / "compose-spec.json").read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(schema)


def test_compose_file_is_valid() -> None:
    """compose.yaml validates against the compose-spec schema."""
    compose_validator().validate(load_compose())


def test_compose_validator_catches_an_unknown_key() -> None:
    """A misspelled service key fails the compose-spec schema."""
    doc = load_compose()
    doc["services"]["llmd"]["healthchek"] = doc["services"]["llmd"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError, match="healthchek"):
        compose_validator().validate(doc)


def test_compose_service() -> None:
    """One llmd service: built image llmd:0.1.0, all GPUs, config read-only, models volume,
    healthcheck on /readyz with python3, restart unless-stopped, port 11434; models pulled by a
    one-shot service it waits for."""
    doc = load_compose()
    llmd = doc["services"]["llmd"]
    assert llmd["image"] == "llmd:0.1.0"
    assert llmd["build"] == {"context": "../..", "dockerfile": "deploy/container/Containerfile"}
    (dev,) = llmd["deploy"]["resources"]["reservations"]["devices"]
    assert dev == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert "./llmd.toml:/etc/llmd/llmd.toml:ro" in llmd["volumes"]
    assert "models:/var/lib/llmd/models" in llmd["volumes"]
    assert llmd["ports"] == ["11434:11434"]
    assert llmd["restart"] == "unless-stopped"
    test = llmd["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python3"] and "/readyz" in test[-1]
    # The healthcheck's Python is at least valid Python.
    compile(test[-1], "healthcheck", "exec")
    assert llmd["depends_on"] == {"pull-models": {"condition": "service_completed_successfully"}}
    assert doc["services"]["pull-models"]["image"] == "llmd:0.1.0"
    cfg = tomllib.loads((COMPOSE / "llmd.toml").read_text(encoding="utf-8"))
    assert [b["gpus"] for b in cfg["backend"]] == [[0], [1]]
    assert [m["name"] for m in cfg["model"]] == ["qwen2.5-coder:7b", "llama3.1:8b", "mistral:7b"]


def test_docker_compose_config() -> None:
    """`docker compose config` accepts the file (where the compose plugin is installed)."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    out = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=dict(os.environ, LLMD_API_KEYS="deploy-test-key-1"),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


if __name__ == "__main__":
    (BASE / "prometheusrule.yaml").write_text(prometheusrule_text(), encoding="utf-8")
