"""The reliability suite: docs/contract.md, "Under load, slow clients, shutdown", on every service.

    .venv/bin/python -m pytest tests/reliability                          # torch, onnx, rust processes
    RELIABILITY_TARGETS=rust .venv/bin/python -m pytest tests/reliability
    RELIABILITY_TARGETS=docker-onnx ...                                   # an image `make images` built
    RELIABILITY_BASE_URL=http://127.0.0.1:3000 QUEUE_CAPACITY=8 ... pytest tests/reliability

Modules: conftest (targets, services, images), policy (the values the services run with, the
checks of an answer), rawhttp (HTTP/1.1 over sockets), observe (/metrics), control (signals,
processes, logs); test_admission, test_slow_clients, test_big_bodies, test_http_layer,
test_shutdown, test_crash; test_overload_figures checks the overload benchmark's arithmetic.
"""
