"""Container images: the local base image (base.py) and the build of all three (build.py)."""
