"""The ceiling: a request's work (JSON, base64, decode, preprocess, inference, JSON) done in-process.

    taskset -c 0 python -m benchmark.ceiling --runtime onnx --seconds 10 [--windows 5] [--payload FILE]

Runs the services' own pipeline (bentos/common.py ``Pipeline.predict``) on one thread,
as fast as it can, and prints one JSON line. A service's throughput divided by this
shows what its serving layer costs. The time is split into windows and the best one
counts: on a shared machine a window that something else slowed down says nothing
about the pipeline, and the best is the steadiest estimate of what it can do.
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


def measure(runtime: str, payload: bytes, seconds: float, windows: int = 1) -> dict:
    from bentos.common import image_bytes

    service_pipeline = pipeline(runtime)

    def predict(body: bytes) -> str:
        return service_pipeline.predict(image_bytes(json.loads(body)["image"])).model_dump_json()

    for _ in range(5):  # warm-up
        predict(payload)
    window_rps = []
    for _ in range(windows):
        count, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / windows:
            predict(payload)
            count += 1
        window_rps.append(count / elapsed)
    best = max(window_rps)
    return {
        "runtime": runtime,
        "seconds": seconds,
        "rps": round(best, 2),
        "mean_ms": round(1000 / best, 3),
        "window_rps": [round(rps, 2) for rps in window_rps],
    }


def main(argv: list[str] | None = None) -> int:
    from benchmark.payload import load_image
    from weather.endpoints import json_request

    parser = argparse.ArgumentParser(
        prog="python -m benchmark.ceiling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runtime", choices=sorted(BENTOS), required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--windows", type=int, default=5, help="split the time into this many; the best counts")
    parser.add_argument("--payload", type=Path, help="JSON payload or image (default: the benchmark payload)")
    args = parser.parse_args(argv)
    payload = json_request(load_image(args.payload)).body
    print(json.dumps(measure(args.runtime, payload, args.seconds, args.windows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
