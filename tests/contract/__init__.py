"""The HTTP contract suite (docs/contract.md), against any implementation given a base URL.

    pytest tests/contract                                   # every registered launcher
    CONTRACT_TARGETS=onnx,docker-rust pytest tests/contract # some of them (see launchers.py)
    CONTRACT_BASE_URL=http://127.0.0.1:3000 pytest tests/contract   # a service already running

Each target is started once per session on a free port, the suite waits for /readyz,
and the target is stopped afterwards (see ``launchers.py`` to add one). Predictions are
checked against the PyTorch reference computed here, in the test process, from the
``weather-torch`` model in the local BentoML store: an external target must serve that
same model.
"""
