"""The Helm chart (helm/alto), rendered offline with Helm's own SDK (helm-python-sdk binds
libhelm; no cluster, no network): `helm lint --strict`, every rendered manifest validated
against the Kubernetes OpenAPI schemas of KUBE_VERSION (kubernetes-validate ships them),
and the chart's meaning checked against alto's: one worker Deployment per stage of the
pipeline spec, KEDA triggers on exactly the streams and consumer groups alto reads, the
Redis URL the processes get, probes, drain and disruption budgets, the dashboard's
metrics, and the README's `helm` commands rendered as written.

KEDA (ScaledObject, TriggerAuthentication) and Prometheus Operator (PodMonitor,
PrometheusRule) kinds
are CRDs without schemas in kubernetes-validate; they are checked field by field here.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import redis
import yaml

from app.cli import _default_instances, _engine_override
from app.metrics import Metrics
from orchestrator.routing import stage_group, stage_streams
from orchestrator.spec import PipelineSpec, load_pipeline
from workers.engines import default_instances
from workers.engines import fleet as fleet_of
from workers.metrics import WorkerMetrics
from workers.redis_transport import stream_key
from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "alto"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
KUBE_VERSION = "1.30.0"  # the oldest Kubernetes we support (Chart.yaml kubeVersion allows 1.27+)
RELEASE, NAMESPACE = "fact", "ml"
PREFIX = f"{RELEASE}-alto"
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "PodMonitor", "PrometheusRule"}
Doc = dict[str, Any]


# ---------------------------------------------------------------------------- helpers
def load_values(path: Path) -> dict[str, Any]:
    """A values file as `helm -f` reads it (Helm's YAML parser, anchors and all)."""
    return helm.values_from_yaml(path.read_text())


def render(values: dict[str, Any], release: str = RELEASE, namespace: str = NAMESPACE) -> list[Doc]:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name=release, namespace=namespace, is_install=True)
    docs = [d for name, text in sorted(out.items()) if name.endswith((".yaml", ".yml"))
            for d in yaml.safe_load_all(text) if d]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    return docs


def lint_problems(values: dict[str, Any]) -> list[str]:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    return [*report["errors"],
            *(f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2)]


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workers(docs: list[Doc]) -> dict[str, Doc]:
    """Worker Deployments by the stage they serve (read from the container's args)."""
    out = {}
    for d in by_kind(docs, "Deployment").values():
        c = d["spec"]["template"]["spec"]["containers"][0]
        if c["args"][:2] == ["alto", "worker"]:
            stage = c["args"][c["args"].index("--stage") + 1]
            assert stage not in out, f"two Deployments serve stage {stage}"
            out[stage] = d
    return out


def container(d: Doc) -> Doc:
    containers = d["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def arg(c: Doc, flag: str) -> list[str]:
    """Every value given to `flag` in a container's args."""
    a = c["args"]
    return [a[i + 1] for i, x in enumerate(a) if x == flag]


def env(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


def chart_spec(docs: list[Doc], tmp_path: Path) -> PipelineSpec:
    """The spec the pods mount, loaded the way `alto` loads it."""
    cm = by_kind(docs, "ConfigMap")[f"{PREFIX}-pipeline"]
    path = tmp_path / "pipeline.yaml"
    path.write_text(cm["data"]["pipeline.yaml"])
    return load_pipeline(path)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of user values: maps merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="module", params=CI_VALUES, ids=lambda p: p.stem)
def case(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any], list[Doc]]]:
    values = load_values(request.param)
    yield request.param.stem, values, render(values)


def test_the_ci_values_cover_the_required_cases() -> None:
    assert {p.stem for p in CI_VALUES} >= {
        "default-values", "external-redis-values", "gpu-values", "autoscaling-keda-values",
        "autoscaling-hpa-values",
    }


# ---------------------------------------------------------------------------- lint + schemas
def test_lint_strict(case: tuple[str, dict[str, Any], list[Doc]]) -> None:
    _, values, _ = case
    assert lint_problems(values) == []


def test_manifests_match_the_kubernetes_schemas(case: tuple[str, dict[str, Any], list[Doc]]) -> None:
    _, _, docs = case
    checked = 0
    for d in docs:
        if d["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{d['kind']}/{d['metadata']['name']}: {exc}")
        checked += 1
    assert checked >= 10


def test_the_validator_catches_a_bad_manifest() -> None:
    """The schema check above is real: a typo'd field in a rendered Deployment fails it."""
    d = copy.deepcopy(by_kind(render({}), "Deployment")[f"{PREFIX}-gateway"])
    kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"replicas": "two"}}, "/gateway/replicas"),
        ({"redis": {"enabled": False}}, "/redis/external/url"),
        ({"redis": {"enabled": False, "external": {"url": "redis://:secret@r:6379/0"}}},
         "/redis/external/url"),
        ({"redis": {"enabled": False, "external": {"url": "redis://user:secret@r:6379/0"}}},
         "/redis/external/url"),
        ({"autoscaling": {"enabled": True, "minReplicas": 0}}, "/autoscaling/minReplicas"),
        ({"autoscaling": {"kind": "vpa"}}, "/autoscaling/kind"),
        ({"workers": {"stages": {"verify": {"gpu": -1}}}}, "/workers/stages/verify/gpu"),
        ({"workers": {"stages": {"verify": {"engine": {"kind": "tgi"}}}}}, "kind"),
        ({"workers": {"defaults": {"replica": 3}}}, "replica"),
        ({"workers": {"stages": {"verfy": {"replicas": 3}}}}, "no such stage"),
        ({"pipeline": {"file": "missing.yaml"}}, "missing.yaml"),
        ({"pipeline": {"inline": "just: text\n"}}, "`name` and `stages`"),
        ({"logFormat": "xml"}, "/logFormat"),
        ({"workers": {"stages": {"verify": {"engine": {"options": {"model": "m"}}}}}},
         "workers.stages.verify.engine: engine options without a kind"),
        ({"workers": {"defaults": {"engine": {"options": {"seed": 1}}}}},
         "engine options without a kind"),
        ({"workers": {"stages": {"verify": {"env": {"ALTO_ENGINE_OPTIONS": '{"seed": 1}'}}}}},
         "workers.stages.verify.engine: engine options without a kind"),
        ({"imagee": {}}, "imagee"),
    ],
)
def test_bad_values_fail_at_install(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


# ---------------------------------------------------------------------------- stages
def test_worker_deployments_match_the_pipeline_stages(
    case: tuple[str, dict[str, Any], list[Doc]], tmp_path: Path
) -> None:
    name, values, docs = case
    spec = chart_spec(docs, tmp_path)
    ws = workers(docs)
    assert set(ws) == set(spec.by_name)
    mounted = by_kind(docs, "ConfigMap")[f"{PREFIX}-pipeline"]["metadata"]["name"]
    for stage, d in ws.items():
        c = container(d)
        assert arg(c, "--pipeline") == ["/etc/alto/pipeline.yaml"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        assert mounts["pipeline"] == "/etc/alto"
        assert vols["pipeline"]["configMap"]["name"] == mounted
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert labels["alto.dev/stage"] == stage and labels["alto.dev/pipeline"] == spec.name
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        override = values.get("workers", {}).get("stages", {}).get(stage, {})
        autoscaled = (values.get("autoscaling", {}).get("enabled", False)
                      and override.get("autoscaling", {}).get("enabled", True))
        if autoscaled:  # the autoscaler owns replicas; an upgrade must not reset them
            assert "replicas" not in d["spec"]
        else:
            assert d["spec"]["replicas"] == override.get("replicas", 1)


def test_gpu_stages_get_gpus_vllm_and_engine_settings(tmp_path: Path) -> None:
    values = load_values(CHART / "ci" / "gpu-values.yaml")
    docs = render(values)
    spec = chart_spec(docs, tmp_path)
    ws = workers(docs)
    gpu_stages = {s for s, o in values["workers"]["stages"].items() if o.get("gpu")}
    assert gpu_stages == {s.name for s in spec.stages if s.kind == "lm"}
    for stage, d in ws.items():
        c, pod = container(d), d["spec"]["template"]["spec"]
        limits = c["resources"].get("limits", {})
        if stage in gpu_stages:
            o = values["workers"]["stages"][stage]
            assert limits["nvidia.com/gpu"] == 1
            assert c["image"].endswith(":0.1.0-vllm")
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
                in pod["tolerations"]
            assert pod["terminationGracePeriodSeconds"] == 120
            # the flags go through the CLI's own parser to the engine spec the worker builds
            engine = _engine_override(arg(c, "--engine")[0], arg(c, "--engine-opt"))
            assert engine is not None and engine.kind == "vllm"
            assert engine.model == o["engine"]["options"]["model"]
            assert engine.options() == {k: v for k, v in o["engine"]["options"].items()
                                        if k != "model"}
            assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
            assert d["spec"]["replicas"] == o["replicas"]
        else:
            assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod
            assert "dshm" not in {m["name"] for m in c["volumeMounts"]}
            assert arg(c, "--engine") == []
            assert c["image"].endswith(":0.1.0")


@pytest.mark.parametrize("kind_from", [
    {"defaults": {"engine": {"kind": "sim"}}},
    {"stages": {"verify": {"env": {"ALTO_ENGINE": "sim"}}}},
], ids=["workers.defaults", "env"])
def test_engine_options_take_their_kind_from_the_defaults_or_env(kind_from: dict[str, Any]) -> None:
    """The install-time refusal of options without a kind (above) sees a kind wherever the
    worker would find one: workers.defaults.engine merged under the stage's, or ALTO_ENGINE
    in the stage's env; the worker's own parser builds the engine from what is rendered."""
    values = {"workers": copy.deepcopy(kind_from)}
    values["workers"].setdefault("stages", {}).setdefault("verify", {})["engine"] = {
        "options": {"time_scale": 0.5}}
    assert lint_problems(values) == []
    c = container(workers(render(values))["verify"])
    settings = Settings.model_construct(engine=env(c).get("ALTO_ENGINE", {}).get("value"))
    engine = _engine_override((arg(c, "--engine") or [None])[0], arg(c, "--engine-opt"), settings)
    assert engine is not None and engine.kind == "sim"
    assert engine.options() == {"time_scale": 0.5}


def test_a_stage_in_front_of_a_fleet_gets_one_instance_per_server(tmp_path: Path) -> None:
    """An openai engine with a list of servers, rendered into a worker's flags and read
    back by the CLI's own parser: the worker runs one engine instance per server."""
    fleet = ["http://vllm-0:8000", "http://vllm-1:8000", "http://vllm-2:8000"]
    values = {"workers": {"stages": {"verify": {"engine": {
        "kind": "openai", "options": {"base_url": fleet, "model": "m"}}}}}}
    assert lint_problems(values) == []
    docs = render(values)
    c = container(workers(docs)["verify"])
    engine = _engine_override(arg(c, "--engine")[0], arg(c, "--engine-opt"))
    assert engine is not None and fleet_of(engine) == fleet and default_instances(engine) == 3
    assert _default_instances(chart_spec(docs, tmp_path), "verify", engine) == 3


def test_an_inline_pipeline_defines_the_workers(tmp_path: Path) -> None:
    """`--set-file pipeline.inline=...`: the stages come from the spec, whatever it is."""
    text = (ROOT / "tests" / "toy" / "pipeline4.yaml").read_text()
    values = {"pipeline": {"inline": text}, "autoscaling": {"enabled": True},
              "workers": {"stages": {"expandx5": {"replicas": 3}}}}
    assert lint_problems(values) == []
    docs = render(values)
    spec = chart_spec(docs, tmp_path)
    assert spec.name == "toy4"
    assert set(workers(docs)) == {"split", "expandx5", "group", "final"}
    _check_scaled_objects(docs, spec, values)
    # `group` aggregates over 3 partitions: one trigger per partition stream
    group = by_kind(docs, "ScaledObject")[f"{PREFIX}-worker-group"]
    assert len(group["spec"]["triggers"]) == 3


# ---------------------------------------------------------------------------- autoscaling
def _check_scaled_objects(docs: list[Doc], spec: PipelineSpec, values: dict[str, Any]) -> None:
    ws = workers(docs)
    deployments = {d["metadata"]["name"]: s for s, d in ws.items()}
    auths = by_kind(docs, "TriggerAuthentication")
    secrets = set(by_kind(docs, "Secret"))
    services = set(by_kind(docs, "Service"))
    scaled = by_kind(docs, "ScaledObject")
    assert scaled
    for so in scaled.values():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        stage = deployments[so["spec"]["scaleTargetRef"]["name"]]
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        triggers = so["spec"]["triggers"]
        # the Redis keys the workers' streams really have, not the streams' names
        assert sorted(t["metadata"]["stream"] for t in triggers) == sorted(
            stream_key(s) for s in stage_streams(spec, stage))
        for t in triggers:
            md = t["metadata"]
            assert t["type"] == "redis-streams"
            assert all(isinstance(v, str) for v in md.values()), md  # KEDA wants strings
            assert md["consumerGroup"] == stage_group(spec.name, stage)
            assert md["lagCount"].isdigit() and int(md["lagCount"]) >= 1
            host, _, port = md["address"].rpartition(":")
            assert port.isdigit()
            if values.get("redis", {}).get("enabled", True):
                assert host == f"{PREFIX}-redis.{NAMESPACE}.svc" and f"{PREFIX}-redis" in services
            auth = auths[t["authenticationRef"]["name"]]
            refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
            external = values.get("redis", {}).get("external", {})
            ref = refs.pop("password")
            assert ref["name"] in secrets or ref["name"] == external.get("existingSecret")
            if "ca" in refs:  # a private CA: for a rediss:// Redis of your own
                assert md["enableTLS"] == "true" and not values["redis"]["enabled"]
                assert refs.pop("ca") == {"parameter": "ca", "name": external["caSecret"],
                                          "key": external.get("caSecretKey", "ca.crt")}
            assert not refs, refs


def test_keda_scales_each_stage_on_its_streams(tmp_path: Path) -> None:
    values = load_values(CHART / "ci" / "autoscaling-keda-values.yaml")
    docs = render(values)
    spec = chart_spec(docs, tmp_path)
    _check_scaled_objects(docs, spec, values)
    scaled = by_kind(docs, "ScaledObject")
    assert f"{PREFIX}-worker-report" not in scaled  # per-stage opt-out
    assert scaled[f"{PREFIX}-worker-verify"]["spec"]["maxReplicaCount"] == 20
    assert scaled[f"{PREFIX}-worker-claims"]["spec"]["maxReplicaCount"] == 10
    assert workers(docs)["report"]["spec"]["replicas"] == 1


@pytest.mark.redis
async def test_keda_triggers_read_the_streams_and_groups_workers_create(
        tmp_path: Path, redis_url: str) -> None:
    """What KEDA would read (XINFO GROUPS on each trigger's stream, its consumerGroup's lag)
    exists once a worker has set its stage up, and counts what waits for it."""
    from orchestrator.envelope import Envelope
    from workers.redis_transport import RedisTransport

    docs = render(load_values(CHART / "ci" / "autoscaling-keda-values.yaml"))
    spec = chart_spec(docs, tmp_path)
    t = RedisTransport(redis_url)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for stage in spec.by_name:
            for s in stage_streams(spec, stage):  # what a worker of the stage does at start
                await t.ensure_group(s, stage_group(spec.name, stage))
        entry = stage_streams(spec, spec.entry_stage)[0]
        await t.publish(entry, Envelope(run="r", pipeline=spec.name, stage=spec.entry_stage,
                                        lineage=(), kind="unit", credit=Fraction(1),
                                        payload="x"))
        for so in by_kind(docs, "ScaledObject").values():
            for trig in so["spec"]["triggers"]:
                md = trig["metadata"]
                groups = {g["name"]: g for g in r.xinfo_groups(md["stream"])}
                assert md["consumerGroup"] in groups, md
                waiting = 1 if md["stream"] == stream_key(entry) else 0
                assert groups[md["consumerGroup"]]["lag"] == waiting
    finally:
        r.close()
        await t.close()


def test_external_redis_url_and_keda_address(tmp_path: Path) -> None:
    values = load_values(CHART / "ci" / "external-redis-values.yaml")
    docs = render(values)
    assert not by_kind(docs, "StatefulSet") and not by_kind(docs, "Secret")
    spec = chart_spec(docs, tmp_path)
    _check_scaled_objects(docs, spec, values)
    for so in by_kind(docs, "ScaledObject").values():
        for t in so["spec"]["triggers"]:
            md = t["metadata"]
            assert md["address"] == "redis.data.svc.cluster.local:6380"
            assert md["databaseIndex"] == "2" and md["enableTLS"] == "true"
    for d in by_kind(docs, "Deployment").values():
        e = env(container(d))
        ref = e["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "alto-redis", "key": "password"}
        url = _expand(e["ALTO_REDIS_URL"]["value"], {"REDIS_PASSWORD": "s3cret"})
        kw = redis.connection.parse_url(url)
        assert (kw["host"], kw["port"], kw["db"], kw["password"]) == \
            ("redis.data.svc.cluster.local", 6380, 2, "s3cret")
        assert kw["connection_class"] is redis.SSLConnection


def _expand(value: str, variables: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: variables[m.group(1)], value)


def test_hpa_alternative_targets_the_lag_metric(tmp_path: Path) -> None:
    values = load_values(CHART / "ci" / "autoscaling-hpa-values.yaml")
    docs = render(values)
    spec = chart_spec(docs, tmp_path)
    ws = workers(docs)
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert not by_kind(docs, "ScaledObject")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == \
        {d["metadata"]["name"] for d in ws.values()}
    exported = _exported_metric_names()
    for h in hpas.values():
        (m,) = h["spec"]["metrics"]
        assert m["type"] == "External"
        metric = m["external"]["metric"]
        assert metric["name"] in exported
        assert metric["selector"]["matchLabels"]["pipeline"] == spec.name
        assert metric["selector"]["matchLabels"]["stage"] in spec.by_name
        assert m["external"]["target"]["averageValue"] == "32"
        assert h["spec"]["maxReplicas"] == 6


# ---------------------------------------------------------------------------- redis
def test_bundled_redis_has_aof_and_a_password_everyone_uses() -> None:
    docs = render({})
    (sts,) = by_kind(docs, "StatefulSet").values()
    c = container(sts)
    a = c["args"]
    assert a[a.index("--appendonly") + 1] == "yes"
    assert a[a.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    secret = by_kind(docs, "Secret")[f"{PREFIX}-redis"]
    assert len(secret["data"]["redis-password"]) >= 32
    for d in [sts, *by_kind(docs, "Deployment").values()]:
        names = [e["name"] for e in container(d)["env"]]
        ref = env(container(d))["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": f"{PREFIX}-redis", "key": "redis-password"}
        if "ALTO_REDIS_URL" in names:  # $(VAR) expands only from variables defined before
            assert names.index("REDIS_PASSWORD") < names.index("ALTO_REDIS_URL")
            url = _expand(env(container(d))["ALTO_REDIS_URL"]["value"], {"REDIS_PASSWORD": "pw"})
            kw = redis.connection.parse_url(url)
            assert (kw["host"], kw["port"], kw["password"]) == (f"{PREFIX}-redis", 6379, "pw")
    assert f"{PREFIX}-redis" in by_kind(docs, "Service")
    chosen = by_kind(render({"redis": {"password": "chosen"}}), "Secret")[f"{PREFIX}-redis"]
    assert chosen["data"]["redis-password"] == "Y2hvc2Vu"  # base64("chosen")


# ---------------------------------------------------------------------------- pods
def test_probes_drain_and_disruption_budgets(case: tuple[str, dict[str, Any], list[Doc]]) -> None:
    _, values, docs = case
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for name, d in by_kind(docs, "Deployment").items():
        pod = d["spec"]["template"]["spec"]
        c = container(d)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c:
                assert c[probe]["httpGet"]["port"] in ports
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        if c["args"][:2] == ["alto", "worker"]:
            assert int(arg(c, "--metrics-port")[0]) == ports["metrics"]
            assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
            assert pod["terminationGracePeriodSeconds"] >= 60
        else:
            assert c["args"][:2] == ["alto", "serve"]
            assert "sleep" in c["lifecycle"]["preStop"]["exec"]["command"]
        pdb = pdbs[name]
        assert pdb["spec"]["maxUnavailable"] == 1
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # no other Deployment's pods fall under this budget
        for other, od in by_kind(docs, "Deployment").items():
            if other != name:
                assert not pdb["spec"]["selector"]["matchLabels"].items() \
                    <= od["spec"]["template"]["metadata"]["labels"].items()
    for svc in by_kind(docs, "Service").values():
        sel = svc["spec"]["selector"].items()
        assert any(sel <= w["spec"]["template"]["metadata"]["labels"].items()
                   for w in [*by_kind(docs, "Deployment").values(),
                             *by_kind(docs, "StatefulSet").values()]), svc["metadata"]["name"]
    for pm in by_kind(docs, "PodMonitor").values():
        sel = pm["spec"]["selector"]["matchLabels"].items()
        ports = {p["name"] for d in by_kind(docs, "Deployment").values()
                 if sel <= d["spec"]["template"]["metadata"]["labels"].items()
                 for p in container(d)["ports"]}
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} == ports == {"http", "metrics"}
    ing = by_kind(docs, "Ingress")
    for i in ing.values():
        backend = i["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend["name"] in by_kind(docs, "Service")


# ---------------------------------------------------------------------------- observability
def _exported_metric_names() -> set[str]:
    """Every series name the gateway and a worker export (histograms: _bucket/_sum/_count)."""
    names: set[str] = set()
    for registry in (Metrics().registry, WorkerMetrics().registry):
        for fam in registry.collect():
            names.add(fam.name)
            if fam.type == "counter":
                names.add(f"{fam.name}_total")
            if fam.type == "histogram":
                names.update(f"{fam.name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def test_dashboard_queries_only_exported_metrics() -> None:
    docs = render({})
    cm = by_kind(docs, "ConfigMap")[f"{PREFIX}-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["alto-dashboard.json"])
    assert dash == json.loads((CHART / "files" / "grafana" / "alto-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    used = {m for e in exprs for m in re.findall(r"\balto_[a-z_]+", e)}
    assert len(used) >= 15
    assert used <= _exported_metric_names(), used - _exported_metric_names()
    for required in ("alto_queue_lag", "alto_stage_call_seconds_bucket", "alto_stage_tokens_total",
                     "alto_stage_call_errors_total", "alto_stage_reclaimed_messages_total"):
        assert required in used
    assert by_kind(render({"metrics": {"dashboard": {"enabled": False}}}), "ConfigMap").keys() \
        == {f"{PREFIX}-pipeline"}


def _metric_labels() -> dict[str, set[str]]:
    """Label names of every exported series (gateway and worker), by series name."""
    labels: dict[str, set[str]] = {}
    for registry in (Metrics().registry, WorkerMetrics().registry):
        for collector in list(registry._collector_to_names):  # noqa: SLF001 - the only listing
            names = set(getattr(collector, "_labelnames", ()))
            for series in registry._collector_to_names[collector]:  # noqa: SLF001
                labels.setdefault(series, set()).update(names)
    return labels


def test_alerts_query_exported_metrics_by_their_labels() -> None:
    """The PrometheusRule (off by default) alerts on series alto exports, grouped and
    filtered only by labels those series have, and keeps Prometheus' own templating
    ({{ $labels.x }}) through Helm's."""
    assert "PrometheusRule" not in {d["kind"] for d in render({})}
    docs = render({"metrics": {"prometheusRule": {"enabled": True, "labels": {"team": "ml"}}}})
    (rule,) = by_kind(docs, "PrometheusRule").values()
    assert rule["metadata"]["labels"]["team"] == "ml"
    rules = rule["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {
        "AltoStageWithoutInstances", "AltoDeadLetters", "AltoQueueBacklog", "AltoRunsFailing",
        "AltoAdmissionRejecting"}
    exported, labels = _exported_metric_names(), _metric_labels()
    for r in rules:
        expr = r["expr"]
        used = set(re.findall(r"\balto_[a-z_]+", expr))
        assert used and used <= exported, (r["alert"], used - exported)
        known = set().union(*(labels[m.removesuffix("_total")] for m in used)) | {"namespace"}
        grouped = {x.strip() for g in re.findall(r"by \(([^)]*)\)", expr) for x in g.split(",")}
        matched = set(re.findall(r"([a-z_]+)\s*=~?\s*\"", expr))
        assert grouped | matched <= known, (r["alert"], (grouped | matched) - known)
        assert expr.count("{") == expr.count("}") and 'namespace="ml"' in expr
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert "{{ $labels." in r["annotations"]["summary"] or "$value" in r["annotations"]["summary"]
    by_alert = {r["alert"]: r for r in rules}
    assert by_alert["AltoDeadLetters"]["expr"].startswith("max by (pipeline) (alto_dead_letters")
    custom = render({"metrics": {"prometheusRule": {
        "enabled": True, "selector": 'job="alto"', "queueLag": 7, "for": {"deadLetters": "5m"}}}})
    (rule,) = by_kind(custom, "PrometheusRule").values()
    by_alert = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert 'alto_queue_lag{job="alto"}) > 7' in by_alert["AltoQueueBacklog"]["expr"]
    assert by_alert["AltoDeadLetters"]["for"] == "5m"
    assert lint_problems({"metrics": {"prometheusRule": {"enabled": True, "queueLag": -1}}})


def test_chart_pipeline_is_the_example() -> None:
    """The chart ships the FacTool example as its default spec; they must not drift."""
    assert (CHART / "files" / "pipeline.yaml").read_text() == \
        (ROOT / "examples" / "factool" / "pipeline.yaml").read_text()


# ---------------------------------------------------------------------------- README
def readme_helm_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Deploy on Kubernetes", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["helm"]:
                commands.append(words)
    return commands


def values_of(command: list[str]) -> tuple[str, str, dict[str, Any]]:
    """(release, namespace, values) of a `helm install|upgrade --install|template` command,
    merged as Helm does: -f files in order, then --set, then --set-file."""
    assert command[1] in ("install", "upgrade", "template"), command
    rest = command[2:]
    positional, files, sets, set_files, namespace = [], [], [], [], "default"
    it = iter(rest)
    for w in it:
        if w in ("-f", "--values"):
            files.append(next(it))
        elif w == "--set":
            sets.append(next(it))
        elif w == "--set-file":
            set_files.append(next(it))
        elif w in ("-n", "--namespace"):
            namespace = next(it)
        elif w in ("--install", "--create-namespace", "--wait", "--atomic"):
            continue
        elif w.startswith("-"):
            pytest.fail(f"README uses a helm flag this test does not know: {w}")
        else:
            positional.append(w)
    release, chart = positional
    assert (ROOT / chart).resolve() == CHART
    values: dict[str, Any] = {}
    for f in files:
        assert (ROOT / f).resolve().parent == CHART / "ci", f"{f}: README values must be tested"
        values = merge(values, load_values(ROOT / f))
    for s in sets:
        values = merge(values, helm.parse_set_string(s))
    for s in set_files:  # paths are relative to the repository root, where README runs
        values = merge(values, helm.parse_set_file(s))
    return release, namespace, values


def test_readme_helm_commands_render_lint_and_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    commands = readme_helm_commands()
    assert len(commands) >= 4
    used_files = {w for c in commands for w in c if w.startswith("helm/alto/ci/")}
    assert len(used_files) >= 3
    for command in commands:
        release, namespace, values = values_of(command)
        assert lint_problems(values) == [], command
        docs = render(values, release=release, namespace=namespace)
        for d in docs:
            if d["kind"] not in CRD_KINDS:
                kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
        cm = by_kind(docs, "ConfigMap")[f"{release}-alto-pipeline"]
        (tmp_path / "p.yaml").write_text(cm["data"]["pipeline.yaml"])
        spec = load_pipeline(tmp_path / "p.yaml")
        assert set(workers(docs)) == set(spec.by_name), command
        for d in by_kind(docs, "Deployment").values():
            if "repository" in values.get("image", {}):
                assert container(d)["image"].startswith(values["image"]["repository"] + ":")


def test_api_keys_live_in_a_secret_the_gateway_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from workers.settings import Settings

    docs = render({"gateway": {"apiKeys": ["k1", "k-2"]}})
    gw = container(by_kind(docs, "Deployment")[f"{PREFIX}-gateway"])
    ref = env(gw)["ALTO_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env(gw)["ALTO_API_KEYS"]
    secret = by_kind(docs, "Secret")[ref["name"]]
    monkeypatch.setenv("ALTO_API_KEYS", base64.b64decode(secret["data"][ref["key"]]).decode())
    assert [k.get_secret_value() for k in Settings().api_keys] == ["k1", "k-2"]
    docs = render({"gateway": {"apiKeysSecret": "mine"}})
    gw = container(by_kind(docs, "Deployment")[f"{PREFIX}-gateway"])
    assert env(gw)["ALTO_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "mine"
    assert f"{PREFIX}-api-keys" not in by_kind(docs, "Secret")
    assert "ALTO_API_KEYS" not in env(container(by_kind(render({}), "Deployment")[f"{PREFIX}-gateway"]))


def test_admin_keys_live_in_a_secret_the_gateway_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from workers.settings import Settings

    docs = render({"gateway": {"apiKeys": ["k1"], "adminApiKeys": ["a1"]}})
    gw = env(container(by_kind(docs, "Deployment")[f"{PREFIX}-gateway"]))
    secrets = by_kind(docs, "Secret")
    for var in ("ALTO_API_KEYS", "ALTO_ADMIN_API_KEYS"):
        ref = gw[var]["valueFrom"]["secretKeyRef"]
        monkeypatch.setenv(var, base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode())
    settings = Settings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1"]
    assert [k.get_secret_value() for k in settings.admin_api_keys] == ["a1"]
    # their own Secret for the API keys, the chart's for the admin keys: only that key in it
    docs = render({"gateway": {"apiKeysSecret": "mine", "adminApiKeys": ["a1"]}})
    gw = env(container(by_kind(docs, "Deployment")[f"{PREFIX}-gateway"]))
    assert gw["ALTO_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "mine"
    own = by_kind(docs, "Secret")[gw["ALTO_ADMIN_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"]]
    assert set(own["data"]) == {"admin-api-keys"}
    docs = render({"gateway": {"adminApiKeysSecret": "ops"}})
    gw = env(container(by_kind(docs, "Deployment")[f"{PREFIX}-gateway"]))
    assert gw["ALTO_ADMIN_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "ops",
                                                                       "key": "admin-api-keys"}
    assert f"{PREFIX}-api-keys" not in by_kind(docs, "Secret")


def test_tracing_endpoint_reaches_every_alto_pod() -> None:
    values = load_values(CHART / "ci" / "autoscaling-hpa-values.yaml")
    endpoint = values["tracing"]["otlpEndpoint"]
    for d in by_kind(render(values), "Deployment").values():
        assert env(container(d))["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == endpoint
    for d in by_kind(render({}), "Deployment").values():
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env(container(d))


def test_env_numbers_render_as_integers_the_settings_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Helm reads YAML numbers as float64, and `toString` writes 1e6 and up as 2e+06,
    which no integer setting parses (QA: ALTO_MAX_BODY_BYTES: 2000000 stopped the gateway)."""
    from workers.settings import Settings

    docs = render({"gateway": {"env": {"ALTO_MAX_BODY_BYTES": 2000000, "ALTO_LOG_LEVEL": "debug"}},
                   "workers": {"stages": {"verify": {"env": {"ALTO_MAX_DELIVERIES": 10000000,
                                                              "ALTO_RESUME_GRACE_S": 2.5}}}}})
    deployments = by_kind(docs, "Deployment")
    gw = env(container(deployments[f"{PREFIX}-gateway"]))
    verify = env(container(deployments[f"{PREFIX}-worker-verify"]))
    assert gw["ALTO_MAX_BODY_BYTES"]["value"] == "2000000"
    assert gw["ALTO_LOG_LEVEL"]["value"] == "debug"
    assert verify["ALTO_MAX_DELIVERIES"]["value"] == "10000000"
    for name in ("ALTO_MAX_BODY_BYTES", "ALTO_MAX_DELIVERIES", "ALTO_RESUME_GRACE_S"):
        value = (gw.get(name) or verify[name])["value"]
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.max_body_bytes, settings.max_deliveries) == (2_000_000, 10_000_000)
    assert settings.resume_grace_s == 2.5


def test_an_external_redis_url_keeps_its_tls_options() -> None:
    """A private CA (`?ssl_ca_certs=...`) must reach ALTO_REDIS_URL, with or without the
    password Secret, and the CA file can be mounted into every alto pod (QA: the schema
    refused the query, and the password path dropped it)."""
    url = "rediss://r.example:6380/2?ssl_cert_reqs=required&ssl_ca_certs=/etc/redis-ca/ca.crt"
    mount = {"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True}
    volume = {"name": "redis-ca", "secret": {"secretName": "redis-ca"}}
    for secret, expect in (
        ("", url),
        ("redis-auth", "rediss://:$(REDIS_PASSWORD)@r.example:6380/2?ssl_cert_reqs=required"
                       "&ssl_ca_certs=/etc/redis-ca/ca.crt"),
    ):
        docs = render({"redis": {"enabled": False,
                                 "external": {"url": url, "existingSecret": secret}},
                       "gateway": {"extraVolumes": [volume], "extraVolumeMounts": [mount]},
                       "workers": {"defaults": {"extraVolumes": [volume],
                                                "extraVolumeMounts": [mount]}}})
        for d in by_kind(docs, "Deployment").values():
            c = container(d)
            assert env(c)["ALTO_REDIS_URL"]["value"] == expect
            assert mount in c["volumeMounts"]
            assert volume in d["spec"]["template"]["spec"]["volumes"]


@pytest.mark.parametrize("secret", ["", "redis-auth"], ids=["no-password", "password"])
def test_an_external_redis_url_may_name_an_acl_user(secret: str) -> None:
    """`redis[s]://user@host...` (a managed Redis with ACLs): the schema refused any user
    info. The user reaches ALTO_REDIS_URL (beside the Secret's password) and KEDA's
    scaler, which reads it from the workers' env; a password in the URL stays refused."""
    url = "rediss://alto-app@r.example:6380/2?ssl_cert_reqs=required"
    docs = render({"redis": {"enabled": False, "external": {"url": url, "existingSecret": secret}},
                   "autoscaling": {"enabled": True, "kind": "keda"}})
    deployments = by_kind(docs, "Deployment")
    for d in deployments.values():
        e = env(container(d))
        assert e["REDIS_USERNAME"]["value"] == "alto-app"
        kw = redis.connection.parse_url(_expand(e["ALTO_REDIS_URL"]["value"],
                                                {"REDIS_PASSWORD": "s3cret"}))
        assert (kw["username"], kw.get("password"), kw["host"], kw["port"], kw["db"]) == \
            ("alto-app", "s3cret" if secret else None, "r.example", 6380, 2)
    scaled = by_kind(docs, "ScaledObject")
    assert scaled
    for so in scaled.values():
        target = container(deployments[so["spec"]["scaleTargetRef"]["name"]])
        for t in so["spec"]["triggers"]:
            assert t["metadata"]["address"] == "r.example:6380"
            user_env = t["metadata"]["usernameFromEnv"]
            assert env(target)[user_env]["value"] == "alto-app"


@pytest.mark.parametrize("secret", ["", "redis-auth"], ids=["no-password", "password"])
def test_keda_gets_the_ca_of_a_private_ca_redis(secret: str, tmp_path: Path) -> None:
    """The alto pods read a private CA from the file their URL's ssl_ca_certs names; KEDA's
    scaler got no CA at all, so it could not verify the server and the workers never
    scaled. `redis.external.caSecret` gives it the CA (TriggerAuthentication `ca`)."""
    values = {"redis": {"enabled": False, "external": {
        "url": "rediss://r.example:6380/2?ssl_ca_certs=/etc/redis-ca/ca.crt",
        "existingSecret": secret, "caSecret": "redis-ca", "caSecretKey": "ca.pem"}},
        "autoscaling": {"enabled": True, "kind": "keda"}}
    docs = render(values)
    (auth,) = by_kind(docs, "TriggerAuthentication").values()
    expected = [{"parameter": "ca", "name": "redis-ca", "key": "ca.pem"}]
    if secret:
        expected.insert(0, {"parameter": "password", "name": secret, "key": "redis-password"})
        _check_scaled_objects(docs, chart_spec(docs, tmp_path), values)
    assert auth["spec"]["secretTargetRef"] == expected
    for so in by_kind(docs, "ScaledObject").values():
        for t in so["spec"]["triggers"]:
            # KEDA refuses its `tls` auth parameter beside enableTLS; `ca` goes with either
            assert t["metadata"]["enableTLS"] == "true"
            assert t["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert lint_problems(values) == []


def test_a_redis_ca_needs_a_tls_url() -> None:
    with pytest.raises(helm.HelmError, match=re.escape("redis.external.caSecret")):
        render({"redis": {"enabled": False, "external": {"url": "redis://r.example:6379/0",
                                                         "caSecret": "redis-ca"}}})


def test_a_stage_s_own_volumes_add_to_the_defaults() -> None:
    """A GPU stage with its own model volume keeps the defaults' Redis CA volume (QA: lists
    were replaced, so that worker lost the CA its ALTO_REDIS_URL names)."""
    ca = {"name": "redis-ca", "secret": {"secretName": "redis-ca"}}
    ca_mount = {"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True}
    models = {"name": "models", "persistentVolumeClaim": {"claimName": "models"}}
    models_mount = {"name": "models", "mountPath": "/models"}
    docs = render({"workers": {
        "defaults": {"extraVolumes": [ca], "extraVolumeMounts": [ca_mount]},
        "stages": {"verify": {"extraVolumes": [models], "extraVolumeMounts": [models_mount]}}}})
    deployments = by_kind(docs, "Deployment")
    verify = deployments[f"{PREFIX}-worker-verify"]
    volumes = verify["spec"]["template"]["spec"]["volumes"]
    assert ca in volumes and models in volumes
    assert ca_mount in container(verify)["volumeMounts"]
    assert models_mount in container(verify)["volumeMounts"]
    claims = deployments[f"{PREFIX}-worker-claims"]
    assert ca in claims["spec"]["template"]["spec"]["volumes"]
    assert models not in claims["spec"]["template"]["spec"]["volumes"]


def test_a_stage_repeating_a_default_volume_gets_it_once() -> None:
    """Before volumes added up, a stage had to repeat the defaults' volumes in its own
    list; that must not render the same name (or mountPath) twice, which Kubernetes
    refuses. The stage's entry wins."""
    ca = {"name": "redis-ca", "secret": {"secretName": "redis-ca"}}
    ca_mine = {"name": "redis-ca", "secret": {"secretName": "my-ca"}}
    mount = {"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True}
    docs = render({"workers": {
        "defaults": {"extraVolumes": [ca], "extraVolumeMounts": [mount]},
        "stages": {"verify": {"extraVolumes": [ca_mine], "extraVolumeMounts": [mount]}}}})
    verify = by_kind(docs, "Deployment")[f"{PREFIX}-worker-verify"]
    volumes = verify["spec"]["template"]["spec"]["volumes"]
    assert [v for v in volumes if v["name"] == "redis-ca"] == [ca_mine]
    assert [m for m in container(verify)["volumeMounts"]
            if m["mountPath"] == "/etc/redis-ca"] == [mount]
