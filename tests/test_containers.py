"""The container images (issue 5), built and run on the local Docker engine.

What a user does, end to end, with a credential in the environment the whole time:

1. ``python -m model_import demo`` into a fresh model store, with
   ``CLOUDSDK_AUTH_ACCESS_TOKEN`` set to a random secret;
2. ``python -m containers.build --no-latest`` (what ``make images`` runs) from that store,
   with the secret still set, so it is present during ``bentoml build``,
   ``bentoml containerize`` and the Rust image build;
3. each image is run (``docker run -p PORT:3000``) and the shared contract suite
   (tests/contract, with ``CONTRACT_BASE_URL``) runs against it; the image must run as a
   non-root ``USER``, and the secret must appear nowhere in it: not in its config (env,
   labels, history) nor in any file of any layer (``docker save``);
4. each image is run as its Kubernetes pod would run it (deploy/k8s): the pod's user, a
   read-only root filesystem with tmpfs where the manifests mount an emptyDir, no
   capabilities, and must still get ready and answer.

Images: ONNX and Rust always. The torch image (5.2 GB: PyPI's torch is the CUDA build)
takes about 4 minutes to build cold, 1 minute to scan and 20 s to start, and adds nothing
container-specific the ONNX image does not already exercise (same base, same BentoML
layout and Dockerfile; the torch service passes the contract suite outside a container),
so it is tested only with ``CONTAINER_TESTS_TORCH=1``.

The images get unique tags (the bento/model versions of the fresh store) and never touch
``:latest``. Afterwards each is kept under one ``:pytest-cache`` tag (the previous run's is
removed), so the next run rebuilds only the layers that changed.

Skipped only when no Docker engine answers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from benchmark.run import docker_exit_times
from harness import REPO, docker
from harness.kubernetes import arguments, deployment_of, docker_run_options, render
from harness.launch import Container, free_port, request
from weather.endpoints import ENDPOINTS
from weather.registry import SERVICES

KEYS = ["onnx", "rust"] + (["torch"] if os.environ.get("CONTAINER_TESTS_TORCH") == "1" else [])
SECRET = f"ya29.container-test-{secrets.token_hex(16)}"
CACHE_TAG = "pytest-cache"
CREDENTIAL_VARIABLES = (
    "CLOUDSDK_AUTH_ACCESS_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
    "GOOGLE_CLOUD_PROJECT",
)
CREDENTIAL_FILES = re.compile(
    r"(^|/)(application_default_credentials\.json|credentials\.db|access_tokens\.db|\.config/gcloud/.*|\.boto|\.netrc)$"
)
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\s+[A-Za-z0-9+/=\s]{64,}-----END [A-Z ]*PRIVATE KEY-----")
# Third-party packages ship test fixtures with throwaway keys (tornado/test/test.key).
PACKAGE_TEST_FILE = re.compile(r"/site-packages/[^/]+/(tests?|testing)/")
SIZE_LIMITS_MB = {"onnx": 410, "rust": 50}


_PROBLEM = docker.available()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"container tests need a Docker engine: {_PROBLEM}")


def _inspect(ref: str) -> dict:
    info = docker.inspect_image(ref)
    assert info is not None, f"no image {ref}"
    return info


def _keep_as_cache(ref: str) -> None:
    """Move ``IMAGE:pytest-cache`` to ``ref``, drop ``ref``'s own tag and the previous cache image."""
    image = ref.rsplit(":", 1)[0]
    cache = f"{image}:{CACHE_TAG}"
    previous = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", cache], capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["docker", "tag", ref, cache], check=True)
    subprocess.run(["docker", "image", "rm", ref], capture_output=True)
    current = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", cache], capture_output=True, text=True
    ).stdout.strip()
    if previous and previous != current:
        subprocess.run(["docker", "image", "rm", previous], capture_output=True)  # fails harmlessly if still in use


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> dict[str, str]:
    """A fresh model store, imported with the secret in the environment (kept set for the build)."""
    store = tmp_path_factory.mktemp("bentoml-home")
    env = {
        **os.environ,
        "BENTOML_HOME": str(store),
        "BENTOML_DO_NOT_TRACK": "1",
        "CLOUDSDK_AUTH_ACCESS_TOKEN": SECRET,
        "GOOGLE_CLOUD_PROJECT": "container-test-project",
    }
    result = subprocess.run(
        [sys.executable, "-m", "model_import", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return env


@pytest.fixture(scope="module")
def images(environment, tmp_path_factory) -> dict[str, dict]:
    """``python -m containers.build`` from that store; key -> its report entry (ref, size_mb, seconds)."""
    report = tmp_path_factory.mktemp("build") / "built.json"
    command = [sys.executable, "-m", "containers.build", "--only", ",".join(KEYS), "--no-latest", "--json", str(report)]
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    built = {entry["key"]: entry for entry in json.loads(report.read_text())}
    assert sorted(built) == sorted(KEYS)
    for entry in built.values():
        reused = " (reused)" if entry["reused"] else ""
        print(f"built {entry['ref']}: {entry['size_mb']:.0f} MB in {entry['seconds']:.0f} s{reused}")
    yield built
    for entry in built.values():
        _keep_as_cache(entry["ref"])


@pytest.mark.parametrize("key", KEYS)
def test_image_runs_as_non_root_user_and_listens_on_3000(images, key):
    config = _inspect(images[key]["ref"])["Config"]
    user = config.get("User") or ""
    assert user, "the image sets no USER"
    assert user.split(":")[0] not in ("root", "0"), f"USER is {user!r}"
    assert "3000/tcp" in (config.get("ExposedPorts") or {}), config.get("ExposedPorts")

    with Container(images[key]["ref"], free_port()) as container:
        # As the host sees them (the engine uses no user namespace remapping here, so uids match).
        processes = subprocess.run(
            ["docker", "top", container.id, "-o", "pid,uid,args"], capture_output=True, text=True, check=True
        ).stdout
        uids = [line.split()[1] for line in processes.splitlines()[1:] if line.strip()]
        assert uids, processes
        assert "0" not in uids, processes


@pytest.mark.parametrize("key", KEYS)
def test_image_runs_as_its_kubernetes_pod(images, key):
    """As deploy/k8s runs it: its user, a read-only root filesystem with tmpfs only where the
    manifests mount an emptyDir, no capabilities, the manifests' environment and args. It gets
    ready, answers a prediction, and serves its metrics (a bento's workers write them to files)."""
    deployment = deployment_of(render("side-by-side"), SERVICES[key])
    options, args = docker_run_options(deployment), arguments(deployment)
    assert "--read-only" in options
    image = io.BytesIO()
    Image.new("RGB", (320, 240), (90, 140, 200)).save(image, "JPEG")
    body = json.dumps({"image": base64.b64encode(image.getvalue()).decode()}).encode()
    with Container(images[key]["ref"], free_port(), options=options, args=args) as container:
        print(f"{images[key]['ref']} {' '.join(options + args)}: /readyz 200 in {container.ready_s:.1f} s")
        status, answer = request(container.port, "POST", "/predict", body, {"Content-Type": "application/json"})
        assert status == 200, f"{status} {answer[:500]!r}\n--- docker logs ---\n{container.logs()}"
        status, metrics = request(container.port, "GET", "/metrics")
        assert status == 200, container.logs()
        assert b"bentoml_service_request_total" in metrics, metrics[:2000]


@pytest.mark.parametrize("key", KEYS)
def test_image_batches_when_asked(images, key):
    """MAX_BATCH_SIZE turns adaptive batching on in the image as built (a bento must carry the
    batchable model service from its build), and every endpoint still answers the same."""
    image = io.BytesIO()
    Image.new("RGB", (320, 240), (90, 140, 200)).save(image, "JPEG")
    answers = set()
    with Container(images[key]["ref"], free_port(), env={"MAX_BATCH_SIZE": "4"}) as container:
        for endpoint in [*ENDPOINTS.values()] * 4:  # enough to reach every worker
            sent = endpoint.request(image.getvalue())
            status, answer = request(container.port, "POST", endpoint.route, sent.body, dict(sent.headers))
            assert status == 200, f"{endpoint.name}: {status} {answer[:500]!r}\n--- docker logs ---\n{container.logs()}"
            answers.add(answer)
    assert len(answers) == 1, answers


@pytest.mark.parametrize("key", KEYS)
def test_image_names_the_model_it_serves(images, environment, key):
    """The benchmark reports which model it measured from this label."""
    model = SERVICES[key].model
    code = f"import bentoml; print(bentoml.models.get({model.latest!r}).tag)"
    stored = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    assert docker.label(images[key]["ref"], docker.MODEL_LABEL) == stored.stdout.strip()


@pytest.mark.parametrize("key", [key for key in KEYS if key in SIZE_LIMITS_MB])
def test_image_size(images, key):
    # The torch image has no limit: PyPI's torch is the CUDA build (its size is printed above).
    assert images[key]["size_mb"] <= SIZE_LIMITS_MB[key]


@pytest.mark.parametrize("key", KEYS)
def test_each_image_can_be_run_to_exit_at_once(images, key):
    """The benchmark times this next to the service's start-up: Docker's own share of it."""
    times = docker_exit_times(SERVICES[key], images[key]["ref"], runs=1, cpuset="0")
    assert times["docker_exit_s_median"] > 0


def test_onnx_image_has_no_torch(images):
    listing = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--entrypoint",
            "python",
            images["onnx"]["ref"],
            "-c",
            "import importlib.util as u; print([m for m in ('torch', 'torchvision') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listing.stdout.strip() == "[]", listing.stdout + listing.stderr


def credential_findings(ref: str, secret: str) -> list[str]:
    """Where ``secret`` (or a credential file, variable or private key) shows up in image ``ref``."""
    found: list[str] = []
    info = _inspect(ref)
    env_names = [entry.split("=", 1)[0] for entry in info["Config"].get("Env") or []]
    found += [f"Config.Env: {name}" for name in sorted(set(env_names) & set(CREDENTIAL_VARIABLES))]
    if secret in json.dumps(info):
        found.append("docker image inspect: the secret")
    history = subprocess.run(
        ["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if secret in history:
        found.append("docker history: the secret")

    # Every file of every layer, the image config and the manifest, as `docker save` writes them.
    needle = secret.encode()
    files = 0
    with (
        subprocess.Popen(["docker", "save", ref], stdout=subprocess.PIPE) as save,
        tarfile.open(fileobj=save.stdout, mode="r|") as outer,
    ):
        for member in outer:
            if not member.isfile():
                continue
            if not member.name.endswith("layer.tar"):
                if needle in outer.extractfile(member).read():
                    found.append(f"{member.name}: the secret")
                continue
            with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as layer:
                for entry in layer:
                    name = "/" + entry.name.lstrip("./")
                    if needle in entry.name.encode() or (entry.issym() and needle in entry.linkname.encode()):
                        found.append(f"{name}: the secret in a file name")
                    if CREDENTIAL_FILES.search(name):
                        found.append(f"{name}: a credential file")
                    if not entry.isfile():
                        continue
                    files += 1
                    data = layer.extractfile(entry).read()
                    if needle in data:
                        found.append(f"{name}: the secret")
                    if not PACKAGE_TEST_FILE.search(name) and PRIVATE_KEY.search(data):
                        found.append(f"{name}: a private key")
    assert save.returncode == 0, f"docker save {ref} failed"
    assert files > 0, f"docker save {ref}: no files in any layer"
    return found


@pytest.mark.parametrize("key", KEYS)
def test_no_credentials_in_the_image(images, key):
    findings = credential_findings(images[key]["ref"], SECRET)
    assert not findings, "\n".join(findings)


def test_the_credential_scan_finds_a_planted_secret(images, tmp_path):
    """The scan above is not vacuous: an image derived from one under test, with the secret
    in a file, an environment variable and a key file, is caught on every count."""
    (tmp_path / "leak.txt").write_text(f"token={SECRET}\n")
    (tmp_path / "Dockerfile").write_text(
        f"FROM {images['rust']['ref']}\n"
        "COPY leak.txt /app/leak.txt\n"
        "COPY leak.txt /app/.config/gcloud/application_default_credentials.json\n"
        f"ENV CLOUDSDK_AUTH_ACCESS_TOKEN={SECRET}\n"
    )
    planted = f"weather-rust-service:pytest-planted-{secrets.token_hex(4)}"
    subprocess.run(
        ["docker", "build", "--quiet", "--tag", planted, str(tmp_path)],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        check=True,
        capture_output=True,
    )
    try:
        findings = "\n".join(credential_findings(planted, SECRET))
    finally:
        subprocess.run(["docker", "image", "rm", planted], capture_output=True)
    for expected in (
        "Config.Env: CLOUDSDK_AUTH_ACCESS_TOKEN",
        "docker image inspect: the secret",
        "docker history: the secret",
        "/app/leak.txt: the secret",
        "application_default_credentials.json: a credential file",
    ):
        assert expected in findings, f"{expected!r} not in:\n{findings}"


@pytest.mark.parametrize("key", KEYS)
def test_contract_suite_against_the_running_container(images, environment, key):
    """tests/contract (the suite every implementation passes) against ``docker run -p PORT:3000``."""
    with Container(images[key]["ref"], free_port()) as container:
        print(f"{images[key]['ref']}: /readyz 200 {container.ready_s:.1f} s after docker run")
        env = {**environment, "CONTRACT_BASE_URL": container.base_url}
        env.pop("CONTRACT_TARGETS", None)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/contract",
                "-q",
                "-p",
                "no:cacheprovider",
                "--no-header",
                "-o",
                "addopts=",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        print(f"contract suite against {key}: {summary}")
        assert result.returncode == 0, (
            f"{result.stdout[-12000:]}\n{result.stderr[-4000:]}\n--- docker logs ---\n{container.logs()}"
        )
        assert re.search(r"\d+ passed", summary), summary
