import os

# No analytics from test runs.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "1")
