"""Real photographs that ship inside installed wheels (nothing can be downloaded here).

scikit-image and matplotlib carry a handful of photos; the parity tests and the
benchmark payload use them. A missing package just means fewer photos.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# (package, path inside the package)
_PHOTOS = {
    "coffee": ("skimage", "data/coffee.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "camera": ("skimage", "data/camera.png"),  # grayscale
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def photo_paths() -> dict[str, Path]:
    """Name -> path of every photo found in the installed packages."""
    found = {}
    for name, (package, relative) in _PHOTOS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if path.is_file():
            found[name] = path
    return found
