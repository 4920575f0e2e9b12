"""What the benchmark, the tests and the image build share to run the services:
starting one (a local process or a container) and waiting until it is ready
(``harness.launch``), the Docker CLI (``harness.docker``), and the Kubernetes
manifests as a cluster would receive them (``harness.kubernetes``).

It depends on ``weather.registry`` for what the services are, and on nothing above it.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
