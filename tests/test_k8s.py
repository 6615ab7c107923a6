"""KubeRay manifests, validated offline: kustomize overlays rendered (the subset of kustomize they
use), each RayService against the KubeRay v1.7 CRD schema with unknown fields rejected, each pod
template with kubernetes-validate in strict mode, the embedded serveConfigV2 with ServeDeploySchema
and against the app (every deployment it names exists), the Secrets templates as Secrets."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonpatch
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = K8S / "schemas"  # the KubeRay v1.7.0 RayService CRD, copied (see its README.md)
OVERLAYS = {"klein-4b": "gpu-4b.yaml", "klein-9b": "gpu-9b.yaml"}
K8S_VERSION = "1.33.0"


def render(folder: Path) -> list[dict]:
    """kustomize build for what our kustomizations use: resources and targeted JSON 6902 patches."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(k) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, (
        f"{folder}: kustomize features the test renderer does not implement: {unsupported}"
    )
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = folder / res
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in k.get("patches", []):
        ops = yaml.safe_load((folder / patch["path"]).read_text())
        t = patch["target"]
        hits = [d for d in docs if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]]
        assert len(hits) == 1, f"patch target {t} matches {len(hits)} resources"
        i = docs.index(hits[0])
        docs[i] = jsonpatch.apply_patch(hits[0], ops)
    return docs


def _strict(schema: dict) -> dict:
    """Mimic the API server's pruning: objects with properties reject unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if isinstance(s, dict):
            if "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
                s.setdefault("additionalProperties", False)
            for v in s.values():
                walk(v)
        elif isinstance(s, list):
            for v in s:
                walk(v)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def rayservice_schema():
    path = CRDS / "ray.io_rayservices.yaml"
    if not path.exists():
        pytest.fail(f"KubeRay CRD copy not found at {path}")
    crd = yaml.safe_load(path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # the API server validates metadata, not the CRD
    return schema


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request):
    docs = render(K8S / "overlays" / request.param)
    return request.param, docs


def _rayservice(docs):
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    return rs


def test_rayservice_matches_the_crd(overlay, rayservice_schema):
    import jsonschema

    name, docs = overlay
    rs = _rayservice(docs)
    assert rs["metadata"]["name"] == name
    errors = sorted(jsonschema.Draft7Validator(rayservice_schema).iter_errors(rs), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def test_the_crd_check_rejects_unknown_fields(overlay, rayservice_schema):
    import jsonschema

    rs = copy.deepcopy(_rayservice(overlay[1]))
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}  # a typo
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "one"
    messages = [e.message for e in jsonschema.Draft7Validator(rayservice_schema).iter_errors(rs)]
    assert any("rayStartParam" in m for m in messages) and any("'one' is not of type" in m for m in messages)


def test_cluster_shape(overlay):
    rs = _rayservice(overlay[1])
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = cluster["workerGroupSpecs"]
    assert 1 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    for tpl in (cluster["headGroupSpec"]["template"], gpu["template"]):
        (c,) = tpl["spec"]["containers"]
        assert c["resources"]["requests"] == c["resources"]["limits"]
        shm = [v for v in tpl["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm[0]["emptyDir"]["medium"] == "Memory"
        assert {"mountPath": "/dev/shm", "name": "dshm"} in c["volumeMounts"]
        assert any(e.get("secretRef", {}).get("name") == "klein-s3" for e in c["envFrom"])
        names = {v["name"]: v for v in tpl["spec"]["volumes"]}
        assert names["api-keys"]["secret"]["secretName"] == "klein-api-keys"
        assert names["weights"]["persistentVolumeClaim"]["readOnly"] is True
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "-/healthz" in worker["readinessProbe"]["exec"]["command"][-1]  # Serve proxy on workers
    assert "local_raylet_healthz" in worker["livenessProbe"]["exec"]["command"][-1]


def test_pod_templates_strict(overlay):
    import kubernetes_validate

    cluster = _rayservice(overlay[1])["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for tpl in templates:
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tpl}
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
           "template": {**templates[0], "spec": {**templates[0]["spec"], "nodeSelectr": {}}}}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_other_resources_strict(overlay):
    import kubernetes_validate

    for doc in overlay[1]:
        if doc["kind"] != "RayService":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    for doc in yaml.safe_load_all((K8S / "secrets" / "secrets.template.yaml").read_text()):
        assert doc["kind"] == "Secret"
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_fill_weights_job_strict_and_runs_klein_download():
    import kubernetes_validate

    from serve.cli import _parser

    (job,) = yaml.safe_load_all((K8S / "jobs" / "fill-weights.yaml").read_text())
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[0] == "klein" and _parser().parse_args(command[1:]).command == "download"
    env = {e["name"]: e for e in container["env"]}
    mounted = container["volumeMounts"][0]["mountPath"]
    assert env["HF_HOME"]["value"].startswith(mounted) and not container["volumeMounts"][0].get("readOnly")
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_serve_config_is_the_apps(overlay):
    from ray.serve.schema import ServeDeploySchema

    from serve.app import DEPLOYMENTS
    from serve.settings import Settings

    name, docs = overlay
    text = _rayservice(docs)["spec"]["serveConfigV2"]
    assert yaml.safe_load(text) == yaml.safe_load((ROOT / "serve" / "configs" / OVERLAYS[name]).read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = config.applications
    assert {d.name for d in app.deployments} == set(DEPLOYMENTS)
    settings = Settings(**app.args)
    assert settings.preset == name and str(settings.weights).startswith("/models/")
    gpus = {d.name: d.ray_actor_options.num_gpus or 0 for d in app.deployments}
    expected = {"klein-4b": (0.5, 0.25, 0.25), "klein-9b": (1.0, 0.5, 0.25)}[name]
    assert (gpus["FlowTransformer"], gpus["TextEmbedder"], gpus["Codec"]) == expected
    for d in app.deployments:
        if d.name != "Ingress":
            assert d.autoscaling_config["max_replicas"] > d.autoscaling_config["min_replicas"] >= 1
    # every stage at its max_replicas fits on the most GPU workers the cluster may add (1 GPU each)
    wanted = sum(d.autoscaling_config["max_replicas"] * gpus[d.name] for d in app.deployments)
    (workers,) = _rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert wanted <= workers["maxReplicas"], (wanted, workers["maxReplicas"])


def test_the_base_serves_gpu_4b_verbatim():
    """`kubectl apply -k k8s/base` deploys serve/configs/gpu-4b.yaml as it is (its header says so):
    a section added to the config and not to the base fails here."""
    text = _rayservice(render(K8S / "base"))["spec"]["serveConfigV2"]
    assert yaml.safe_load(text) == yaml.safe_load((ROOT / "serve" / "configs" / "gpu-4b.yaml").read_text())


def test_dockerfile_installs_like_the_readme():
    text = (K8S / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM nvidia/cuda:" in text
    assert "python3.11 -m venv" in text and "pip install ." in text
    assert "wget" in text  # the KubeRay probes run wget
