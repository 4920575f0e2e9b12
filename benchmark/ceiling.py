"""The ceiling: a request's work (JSON, base64, decode, preprocess, inference, JSON) done in-process.

    taskset -c 0 python -m benchmark.ceiling --runtime onnx --seconds 10 [--payload FILE]

Runs the services' own pipeline (bentos/common.py ``Pipeline.predict``) on one thread,
as fast as it can, and prints one JSON line. A service's throughput divided by this
shows what its serving layer costs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from weather.registry import BENTOS

# One thread everywhere, like a service worker with one intra-op thread.
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[variable] = "1"


def pipeline(runtime: str):
    """The service's own request pipeline (``Pipeline.predict``: body in, response out)."""
    import bentoml

    service = BENTOS[runtime]
    module = importlib.import_module(service.bento.module)
    return module.load_pipeline(bentoml.models.get(service.model.latest))


def measure(runtime: str, payload: bytes, seconds: float) -> dict:
    from bentos.common import image_bytes

    service_pipeline = pipeline(runtime)

    def predict(body: bytes) -> str:
        return service_pipeline.predict(image_bytes(json.loads(body)["image"])).model_dump_json()

    for _ in range(5):  # warm-up
        predict(payload)
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        predict(payload)
        count += 1
    return {
        "runtime": runtime,
        "requests": count,
        "seconds": round(elapsed, 3),
        "rps": round(count / elapsed, 2),
        "mean_ms": round(1000 * elapsed / count, 3),
    }


def main(argv: list[str] | None = None) -> int:
    from benchmark.payload import load_image
    from weather.endpoints import json_request

    parser = argparse.ArgumentParser(
        prog="python -m benchmark.ceiling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runtime", choices=sorted(BENTOS), required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--payload", type=Path, help="JSON payload or image (default: the benchmark payload)")
    args = parser.parse_args(argv)
    payload = json_request(load_image(args.payload)).body
    print(json.dumps(measure(args.runtime, payload, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
