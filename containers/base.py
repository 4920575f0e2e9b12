"""A local base image for the bentos, for a Docker engine that can pull nothing.

    python -m containers.base            # build model-serving-base:bookworm-py311 unless it is current
    python -m containers.base --force    # rebuild it anyway

Debian bookworm (``mmdebstrap --variant=essential``: the Essential packages, no apt)
with its Python 3.11, bash, ``groupadd``/``useradd`` (passwd), ca-certificates and
``uv`` on PATH, imported with ``docker import``. That is what the Dockerfile BentoML
generates for a bento with ``docker.base_image`` in the v1 layout needs (see
containers/build.py): it runs as root, creates the ``bentoml`` user, creates
``/app/.venv`` with ``uv venv`` and installs the bento's locked requirements with
``uv pip install``. No apt and no pip: nothing in that Dockerfile uses them (BentoML's
v2 layout would run ``apt-get install build-essential git``, which is why build.py
uses v1), and every package the bentos need is a wheel.

Kept small, because the ONNX image should stay under 400 MB: no recommends, no docs,
man pages or translations (dpkg path excludes), merged /usr without the ``usrmerge``
package (it drags in perl), and ``UV_NO_CACHE=1`` so the install layer does not also
keep uv's download cache. uv comes from its PyPI wheel.

CA certificates that this machine added locally (``/usr/local/share/ca-certificates``,
e.g. the root of a TLS-intercepting proxy between the build and PyPI) are copied in,
so ``uv`` inside ``docker build`` trusts what the host trusts. They are public
certificates, never keys; the image records which ones in a label.

The image carries a label with a hash of this recipe (packages, uv version, extra CAs):
an image with the current hash is reused, anything else is rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from containers.errors import BuildError
from harness import docker
from weather.cache import cache_root

BASE_IMAGE = "model-serving-base:bookworm-py311"
RECIPE_LABEL = "org.model-serving.base-recipe"
CA_LABEL = "org.model-serving.extra-ca-certificates"

SUITE = "bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
# On top of the Essential packages. libstdc++6: manylinux wheels (numpy, onnxruntime) link it.
PACKAGES = ["python3", "passwd", "ca-certificates", "libstdc++6"]
PYTHON_VERSION = "3.11"  # bookworm's python3
UV_VERSION = "0.13.9"  # BentoML's Dockerfile needs uv >= 0.13.4 (or a pip allowed to install system-wide)
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
CACHE = cache_root() / "containers"

DPKG_OPTIONS = [
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
]
APT_OPTIONS = ['APT::Install-Recommends "false"', 'APT::Install-Suggests "false"']
IMAGE_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
    # uv uses the system Python, never a downloaded one, and keeps no cache in the image.
    "ENV UV_PYTHON_DOWNLOADS=never",
    "ENV UV_NO_CACHE=1",
    'CMD ["/bin/bash"]',
]


def log(message: str) -> None:
    print(f"containers: {message}", file=sys.stderr, flush=True)


def extra_ca_certificates() -> list[Path]:
    return sorted(EXTRA_CA_DIR.glob("**/*.crt")) if EXTRA_CA_DIR.is_dir() else []


def recipe_hash() -> str:
    recipe = {
        "suite": SUITE,
        "mirrors": [MIRROR, SECURITY_MIRROR],
        "packages": PACKAGES,
        "dpkg": DPKG_OPTIONS,
        "apt": APT_OPTIONS,
        "changes": IMAGE_CHANGES,
        "uv": UV_VERSION,
        "ca": {
            str(path.relative_to(EXTRA_CA_DIR)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in extra_ca_certificates()
        },
        "variant": "essential",
        "recipe-version": 1,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def is_current(image: str = BASE_IMAGE) -> bool:
    info = docker.inspect_image(image)
    return info is not None and (info["Config"].get("Labels") or {}).get(RECIPE_LABEL) == recipe_hash()


def ensure_mmdebstrap() -> str:
    found = shutil.which("mmdebstrap")
    if found:
        return found
    if os.geteuid() != 0:
        raise BuildError("mmdebstrap is missing: `sudo apt-get install mmdebstrap` (Debian/Ubuntu), then re-run")
    log("installing mmdebstrap with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "mmdebstrap"]
    if subprocess.run(install, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    return shutil.which("mmdebstrap") or "mmdebstrap"


def uv_binary() -> Path:
    """The ``uv`` executable from uv's PyPI wheel (downloaded once into the cache)."""
    target = CACHE / f"uv-{UV_VERSION}" / "uv"
    if target.is_file():
        return target
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = next(iter(sorted(wheels.glob(f"uv-{UV_VERSION}-*.whl"))), None)
    if wheel is None:
        log(f"downloading the uv {UV_VERSION} wheel from PyPI")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                f"uv=={UV_VERSION}",
                "--dest",
                str(wheels),
            ],
            check=True,
        )
        wheel = next(iter(sorted(wheels.glob(f"uv-{UV_VERSION}-*.whl"))))
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(f"uv-{UV_VERSION}.data/scripts/uv")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(target)
    return target


def build(image: str = BASE_IMAGE) -> None:
    mmdebstrap = ensure_mmdebstrap()
    uv = uv_binary()
    cas = extra_ca_certificates()
    started = time.monotonic()
    log(f"building {image} with mmdebstrap ({SUITE}, essential + {', '.join(PACKAGES)}, uv {UV_VERSION})")
    with tempfile.TemporaryDirectory(prefix="model-serving-base-") as tmp:
        staging = Path(tmp, "add")
        (staging / "bin").mkdir(parents=True)
        shutil.copy2(uv, staging / "bin" / "uv")
        (staging / "ca").mkdir()
        for ca in cas:
            shutil.copy2(ca, staging / "ca" / ca.name)
        rootfs = Path(tmp, "rootfs.tar")
        command = [
            mmdebstrap,
            "--variant=essential",
            "--format=tar",
            f"--include={','.join(PACKAGES)}",
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            *(f"--aptopt={option}" for option in APT_OPTIONS),
            *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
            f"--customize-hook=copy-in {staging / 'bin' / 'uv'} /usr/local/bin",
        ]
        if cas:
            copied = " ".join(str(staging / "ca" / ca.name) for ca in cas)
            command += [
                f"--customize-hook=copy-in {copied} /usr/local/share/ca-certificates",
                '--customize-hook=chroot "$1" update-ca-certificates',
            ]
        command += [
            '--customize-hook=chroot "$1" python3 --version',
            '--customize-hook=chroot "$1" uv --version',
            '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/apt/* '
            '"$1"/var/log/dpkg.log "$1"/var/log/alternatives.log',
            SUITE,
            str(rootfs),
            f"deb {MIRROR} {SUITE} main",
            f"deb {MIRROR} {SUITE}-updates main",
            f"deb {SECURITY_MIRROR} {SUITE}-security main",
        ]
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL)
        labels = {
            RECIPE_LABEL: recipe_hash(),
            CA_LABEL: ",".join(ca.name for ca in cas),
            "org.opencontainers.image.description": (
                f"Debian {SUITE} (essential), Python {PYTHON_VERSION}, uv {UV_VERSION}: "
                "local base image for BentoML bentos"
            ),
        }
        changes = [*IMAGE_CHANGES, *(f"LABEL {key}={json.dumps(value)}" for key, value in labels.items())]
        previous = docker.image_id(image)
        subprocess.run(
            ["docker", "import", *(arg for change in changes for arg in ("--change", change)), str(rootfs), image],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if previous and previous != docker.image_id(image):
        docker.remove_image_if_unused(previous)
    log(f"built {image} ({docker.size_mb(image):.0f} MB) in {time.monotonic() - started:.0f} s")


def ensure(image: str = BASE_IMAGE, force: bool = False) -> str:
    """Build the base image unless an image of the current recipe exists; return its name."""
    if not force and is_current(image):
        log(f"reusing {image} ({docker.size_mb(image):.0f} MB)")
        return image
    build(image)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m containers.base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if a current image exists")
    parser.add_argument("--image", default=BASE_IMAGE, help=f"image name (default {BASE_IMAGE})")
    args = parser.parse_args(argv)
    try:
        ensure(args.image, force=args.force)
    except (BuildError, subprocess.CalledProcessError) as error:
        print(f"containers: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
