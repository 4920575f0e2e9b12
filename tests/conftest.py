import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# No analytics from test runs.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "1")
# Every test session has a model store of its own holding the demo model, so the tests
# neither depend on nor change the user's ~/bentoml. Set before anything imports bentoml.
if "CONTRACT_BASE_URL" not in os.environ:
    os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="model-serving-tests-bentoml-")


@pytest.fixture(scope="session", autouse=True)
def demo_models_in_store():
    """The demo model in the session's store (trained once, then reused from the cache)."""
    if "CONTRACT_BASE_URL" in os.environ:  # testing a service that is already running
        yield
        return
    result = subprocess.run([sys.executable, "-m", "model_import", "demo"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.exit(f"could not import the demo model:\n{result.stderr}", returncode=3)
    yield
    shutil.rmtree(os.environ["BENTOML_HOME"], ignore_errors=True)
