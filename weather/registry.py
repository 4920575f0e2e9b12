"""The models and the three services, each described once.

Everything that needs to know which models exist, under which tag and file name,
and how each service is built, started and measured reads it from here: the bentos,
the importer, the image build, the benchmark and the tests. It imports nothing heavy
(no bentoml, no torch), so every one of them, the Locust process and the bentos
included, may import it.

Commands are data. Their arguments may name placeholders that only the running
machine knows, filled in by ``harness.process``:

    {python}               this interpreter (the project's venv)
    {onnxruntime_library}  libonnxruntime.so.1.* from the installed onnxruntime wheel
    {payload} {seconds}    the ceiling's request body file and its duration

A relative first argument is a path inside the repository.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Model:
    """A model in the BentoML store: its name, and the one artifact file in its directory."""

    name: str
    file: str
    framework: str

    @property
    def latest(self) -> str:
        """The tag of its newest version in the store."""
        return f"{self.name}:latest"


TORCH_MODEL = Model("weather-torch", "model.pt", framework="pytorch")
ONNX_MODEL = Model("weather-onnx", "model.onnx", framework="onnx")
MODELS = (TORCH_MODEL, ONNX_MODEL)


# A bento worker logs ``startup {"process_started": <epoch s>, "<step>": <s since then>, ...}``
# once its model is ready (bentos/common.py); the benchmark reads it to show where start-up goes.
STARTUP_LOG_PREFIX = "startup "
STARTUP_STEPS = ("service_created", "runtime_imported", "model_loaded", "warmed_up", "ready")


@dataclass(frozen=True)
class Bento:
    """How a BentoML service is built: its bentofile and its ``module:Class``."""

    bentofile: str  # relative to the repository root, the build context
    service: str

    @property
    def module(self) -> str:
        return self.service.partition(":")[0]

    @property
    def cls(self) -> str:
        return self.service.partition(":")[2]


@dataclass(frozen=True)
class Service:
    """One of the three implementations of docs/contract.md."""

    name: str  # the key on every command line and in results.json
    title: str
    model: Model  # the model it serves (and bundles into its image)
    image: str  # container image name, tagged :<version> and :latest by `make images`
    # Serves the contract as a local process; `--host H --port P` are appended.
    command: tuple[str, ...]
    # The request pipeline in-process on one thread, printing one JSON line (the benchmark's ceiling).
    ceiling: tuple[str, ...]
    environment: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    bento: Bento | None = None
    # `docker run --rm` arguments that start its image and exit at once ({image} is the image):
    # the benchmark times them next to the service's start-up, so Docker's own share is visible.
    exit_at_once: tuple[str, ...] = ("--entrypoint", "true", "{image}")


def _bento_service(name: str, title: str, model: Model, bentofile: str, service: str) -> Service:
    """A BentoML service: served by `bentoml serve`, its ceiling measured by benchmark/ceiling.py."""
    return Service(
        name=name,
        title=title,
        model=model,
        image=f"weather-{name}-service",
        command=("{python}", "-m", "bentoml", "serve", service),
        ceiling=(
            "{python}",
            "-m",
            "benchmark.ceiling",
            "--runtime",
            name,
            "--payload",
            "{payload}",
            "--seconds",
            "{seconds}",
        ),
        bento=Bento(bentofile, service),
    )


SERVICES: Mapping[str, Service] = MappingProxyType(
    {
        "torch": _bento_service(
            "torch",
            "BentoML + PyTorch",
            TORCH_MODEL,
            "bentos/bentofile.torch.yaml",
            "bentos.torch_service:TorchClassifier",
        ),
        "onnx": _bento_service(
            "onnx", "BentoML + ONNX Runtime", ONNX_MODEL, "bentofile.yaml", "bentos.onnx_service:OnnxClassifier"
        ),
        "rust": Service(
            name="rust",
            title="Rust (actix-web + ort)",
            model=ONNX_MODEL,
            image="weather-rust-service",
            command=("rust_service/target/release/rust_service",),
            ceiling=("rust_service/target/release/examples/ceiling", "{payload}", "{seconds}"),
            environment=MappingProxyType({"ORT_DYLIB_PATH": "{onnxruntime_library}"}),
            exit_at_once=("{image}", "--version"),  # FROM scratch: nothing in the image but the service
        ),
    }
)
BENTOS: Mapping[str, Service] = MappingProxyType({name: s for name, s in SERVICES.items() if s.bento is not None})
