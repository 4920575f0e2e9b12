"""Build the three container images (what ``make images`` runs).

    python -m containers.build                      # all three, base image chosen automatically
    python -m containers.build --local-base         # build/reuse the local Debian base, never pull
    python -m containers.build --registry-base      # BentoML's python:3.11-slim (needs a registry)
    python -m containers.build --only onnx,rust     # some of them (onnx, torch, rust)

Images (each tagged with its version and ``latest``):

    weather-onnx-service:<bento version>   bentoml build + bentoml containerize of bentofile.yaml
    weather-torch-service:<bento version>  the same for bentos/bentofile.torch.yaml
    weather-rust-service:<model version>   rust_service/build-image.sh (FROM scratch)

The models come from the BentoML store at $BENTOML_HOME (default ~/bentoml): run
``python -m model_import demo`` (``make run``) first.

Base image. The Dockerfile BentoML generates starts ``FROM python:3.11-slim``. Where a
registry answers (the image is present or ``docker pull`` works) the bentos use that
image; where none does, ``containers/base.py`` builds ``model-serving-base:bookworm-py311``
from Debian packages (mmdebstrap + ``docker import``) and the bentos use it instead.

How a bento gets its base image without touching the project's bentofiles: each bento
is built from a generated copy of its bentofile with ``docker.base_image`` set, and with
``BENTOML_ENABLE_FEATURES=no_image``, which selects BentoML's v1 bento layout. The v2
layout would put ``apt-get install build-essential git`` (about 300 MB, and apt lists)
into every image whatever the base; v1 with a base image installs only the bento's
locked Python requirements (with uv) onto it. Every package here is a wheel, so nothing
needs a compiler, and the ONNX image stays under 400 MB.

Reuse. A bento's version is a hash of what goes into it (the generated bentofile, the
included source files, the model versions, the BentoML version), so an unchanged bento
is not rebuilt, and its image (tagged with that version and labelled with the base
image's ID) is not rebuilt either. The base image is reused while its recipe is
unchanged. The Rust image is rebuilt by its own script every time, which costs little:
cargo and Docker's layer cache make an unchanged rebuild a no-op.

Docker. With no ``docker buildx`` BentoML's default ``DOCKER_BUILDKIT=1`` fails, so the
build then sets ``DOCKER_BUILDKIT=0`` (the legacy builder). ``--opt network=host`` lets
the build reach PyPI the way the host does; nothing is ever pulled except the probe for
python:3.11-slim in automatic mode.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from containers import base
from containers.errors import BuildError
from harness import REPO, docker
from harness.docker import BASE_ID_LABEL, BENTO_LABEL, MODEL_LABEL
from weather.registry import BENTOS, SERVICES, Model, Service

REGISTRY_BASE = "python:3.11-slim"  # BentoML's own base image for distro debian, Python 3.11
LAYOUT = "v1"  # BENTOML_ENABLE_FEATURES=no_image, see the module docstring
# A bento's services are fixed when it is built, and a bento serves only those. Built with
# batching on, it carries the batchable model service too, so MAX_BATCH_SIZE can turn
# batching on in the container; served without it, that service is simply not started.
BUILD_ENV = {"MAX_BATCH_SIZE": "2"}
# The CLI in this interpreter; quiet about the duplicate --quiet option click warns of.
BENTOML = [sys.executable, "-W", "ignore::UserWarning", "-m", "bentoml"]
RUST_SCRIPT = REPO / "rust_service" / "build-image.sh"


@dataclass
class Built:
    key: str
    image: str
    version: str
    seconds: float
    reused: bool

    @property
    def ref(self) -> str:
        return f"{self.image}:{self.version}"


def log(message: str) -> None:
    print(f"containers: {message}", file=sys.stderr, flush=True)


def stored_model(model: Model):
    """The newest version of ``model`` in the BentoML store (a ``bentoml.Model``)."""
    import bentoml

    try:
        return bentoml.models.get(model.latest)
    except bentoml.exceptions.NotFound:
        raise BuildError(
            f"no model {model.name} in the BentoML store: run `python -m model_import demo` (make run) first"
        ) from None


def choose_base(mode: str) -> str:
    if mode == "local":
        return base.ensure()
    if mode == "registry":
        if docker.inspect_image(REGISTRY_BASE) is None and not docker.pull(REGISTRY_BASE):
            raise BuildError(f"cannot pull {REGISTRY_BASE}; use --local-base")
        return REGISTRY_BASE
    if docker.inspect_image(REGISTRY_BASE) is not None:
        log(f"using {REGISTRY_BASE} (present locally)")
        return REGISTRY_BASE
    if docker.pull(REGISTRY_BASE, timeout=300):
        log(f"using {REGISTRY_BASE} (pulled)")
        return REGISTRY_BASE
    log(f"cannot pull {REGISTRY_BASE} (no registry reachable): using the local base image {base.BASE_IMAGE}")
    return base.ensure()


def generated_bentofile(service: Service, base_image: str) -> dict:
    config = yaml.safe_load((REPO / service.bento.bentofile).read_text())
    docker_options = dict(config.get("docker") or {})
    ignored = sorted(set(docker_options) & {"distro", "python_version", "cuda_version", "system_packages"})
    if ignored:
        log(f"{service.bento.bentofile}: docker.{', docker.'.join(ignored)} ignored: the base image is {base_image}")
    docker_options["base_image"] = base_image
    config["docker"] = docker_options
    return config


def included_files(config: dict) -> list[Path]:
    """The files ``include`` selects (relative to the repo root), for the content hash."""
    patterns = config.get("include")
    if not patterns:  # BentoML's default is the whole context: hash what git tracks
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
        )
        return sorted(REPO / line for line in listed.stdout.splitlines() if (REPO / line).is_file())
    files: set[Path] = set()
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        for match in glob.glob(pattern, root_dir=REPO, recursive=True):
            path = REPO / match
            if path.is_dir():
                files.update(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
            elif path.is_file():
                files.add(path)
    return sorted(files)


def bento_version(config: dict, model: str) -> str:
    """A hash of what goes into the bento: its bentofile, sources, model tag and BentoML."""
    import bentoml

    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {
                "bentofile": config,
                "layout": LAYOUT,
                "bentoml": bentoml.__version__,
                "model": model,
                "build_env": BUILD_ENV,
            },
            sort_keys=True,
        ).encode()
    )
    for path in included_files(config):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def bento_exists(name: str, version: str) -> bool:
    import bentoml

    try:
        bentoml.bentos.get(f"{name}:{version}")
    except bentoml.exceptions.NotFound:
        return False
    return True


def bentoml_env() -> dict[str, str]:
    env = dict(os.environ)
    env["BENTOML_DO_NOT_TRACK"] = "1"
    features = [f for f in env.get("BENTOML_ENABLE_FEATURES", "").split(",") if f]
    env["BENTOML_ENABLE_FEATURES"] = ",".join([*features, "no_image"] if "no_image" not in features else features)
    if "DOCKER_BUILDKIT" not in env and not docker.buildx_available():
        env["DOCKER_BUILDKIT"] = "0"
    return env


def build_bento(service: Service, model: str, base_image: str, force: bool) -> tuple[str, str]:
    """``bentoml build`` unless this exact bento exists; returns (bento name, version)."""
    config = generated_bentofile(service, base_image)
    name = config["name"]
    version = bento_version(config, model)
    if bento_exists(name, version) and not force:
        log(f"reusing bento {name}:{version}")
        return name, version
    with tempfile.TemporaryDirectory(prefix="bentofile-") as tmp:
        bentofile = Path(tmp, "bentofile.yaml")
        bentofile.write_text(
            f"# Generated by containers/build.py from {service.bento.bentofile}: docker.base_image added.\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
        log(f"bentoml build {name}:{version} (from {service.bento.bentofile}, base {base_image})")
        if bento_exists(name, version):  # --force: replace it
            subprocess.run(
                [*BENTOML, "delete", "-y", f"{name}:{version}"],
                env=bentoml_env(),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        command = [*BENTOML, "build", "-f", str(bentofile), "--version", version, "--output", "tag", str(REPO)]
        subprocess.run(command, cwd=REPO, env={**bentoml_env(), **BUILD_ENV}, check=True, stdout=subprocess.DEVNULL)
    return name, version


def containerize(service: Service, base_image: str, force: bool, latest: bool) -> Built:
    started = time.monotonic()
    model = str(stored_model(service.model).tag)  # the one the bento bundles and its image is labelled with
    name, version = build_bento(service, model, base_image, force)
    ref = f"{service.image}:{version}"
    base_id = docker.image_id(base_image)
    reused = not force and docker.label(ref, BASE_ID_LABEL) == base_id
    if reused:
        log(f"reusing image {ref} ({docker.size_mb(ref):.0f} MB)")
    else:
        log(f"bentoml containerize {name}:{version} -> {ref}")
        labels = {
            BASE_ID_LABEL: base_id,
            BENTO_LABEL: f"{name}:{version}",
            MODEL_LABEL: model,
        }
        command = [
            *BENTOML,
            "containerize",
            f"{name}:{version}",
            "--image-tag",
            ref,
            "--opt",
            "network=host",
            "--opt",
            "force-rm",
        ]
        for key, value in labels.items():
            command += ["--opt", f"label={key}={value}"]
        subprocess.run(command, cwd=REPO, env=bentoml_env(), check=True, stdout=subprocess.DEVNULL)
        # bentoml containerize logs a failed docker build and still exits 0.
        if docker.label(ref, BENTO_LABEL) != f"{name}:{version}":
            raise BuildError(f"bentoml containerize did not produce {ref} (see the docker build output above)")
    if latest:
        docker.tag(ref, f"{service.image}:latest")
    return Built(service.name, service.image, version, time.monotonic() - started, reused)


def build_rust(latest: bool) -> Built:
    """``rust_service/build-image.sh``, tagged with the version of the model it bundles."""
    started = time.monotonic()
    service = SERVICES["rust"]
    model = stored_model(service.model)
    ref = f"{service.image}:{model.tag.version}"
    previous = docker.image_id(ref)
    env = {**os.environ, "MODEL_PATH": model.path}
    if "DOCKER_BUILDKIT" not in os.environ and not docker.buildx_available():
        env["DOCKER_BUILDKIT"] = "0"
    log(f"{RUST_SCRIPT.relative_to(REPO)} {ref}")
    label = f"{MODEL_LABEL}={model.tag}"
    subprocess.run(
        ["bash", str(RUST_SCRIPT), ref, "--label", label], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL
    )
    if latest:
        docker.tag(ref, f"{service.image}:latest")
    reused = previous == docker.image_id(ref)
    return Built(service.name, service.image, model.tag.version, time.monotonic() - started, reused)


def build(only: list[str], mode: str = "auto", force: bool = False, latest: bool = True) -> list[Built]:
    problem = docker.available()
    if problem:
        raise BuildError(problem)
    built = []
    base_image = choose_base(mode) if set(only) & set(BENTOS) else None
    for name in only:
        built.append(containerize(BENTOS[name], base_image, force, latest) if name in BENTOS else build_rust(latest))
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m containers.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--local-base",
        dest="mode",
        action="store_const",
        const="local",
        help=f"use the local Debian base image {base.BASE_IMAGE} (built if needed); never pull",
    )
    where.add_argument(
        "--registry-base",
        dest="mode",
        action="store_const",
        const="registry",
        help=f"use {REGISTRY_BASE} (pulled if needed)",
    )
    parser.add_argument(
        "--only", default=",".join(SERVICES), help=f"comma-separated subset of {','.join(SERVICES)} (default: all)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild the bentos and images even if they exist")
    parser.add_argument("--no-latest", dest="latest", action="store_false", help="do not move the :latest tags")
    parser.add_argument(
        "--json", metavar="PATH", help="also write what was built (image, version, size, seconds) to PATH as JSON"
    )
    parser.set_defaults(mode="auto")
    args = parser.parse_args(argv)
    only = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = sorted(set(only) - set(SERVICES))
    if unknown or not only:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(SERVICES)}")
    with contextlib.suppress(KeyboardInterrupt):
        started = time.monotonic()
        try:
            built = build(only, args.mode, args.force, args.latest)
        except BuildError as error:
            print(f"containers: error: {error}", file=sys.stderr)
            return 1
        except subprocess.CalledProcessError as error:
            print(
                f"containers: error: {' '.join(map(str, error.cmd[:4]))} ... failed with exit code {error.returncode}",
                file=sys.stderr,
            )
            return 1
        print(f"{'image':<45} {'size':>8}  {'time':>6}")
        for item in built:
            note = " (reused)" if item.reused else ""
            print(f"{item.ref:<45} {docker.size_mb(item.ref):>5.0f} MB  {item.seconds:>5.0f}s{note}")
        print(f"total {time.monotonic() - started:.0f} s")
        if args.json:
            report = [
                {**asdict(item), "ref": item.ref, "size_mb": round(docker.size_mb(item.ref), 1)} for item in built
            ]
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    return 130


if __name__ == "__main__":
    sys.exit(main())
