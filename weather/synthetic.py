"""Procedural stand-ins for the 11 weather classes.

No real training data can be downloaded here, so the demo model learns from these.
Each class has its own scene (palette, texture, shapes) and every image varies in
size, colours, positions and noise, so a model has to look at the picture to
tell them apart.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from weather.contract import LABELS

Color = tuple[int, int, int]


def generate(label: str, rng: np.random.Generator) -> Image.Image:
    """One RGB image of the given class, of random size (between 240 and 480 pixels a side)."""
    width, height = (int(v) for v in rng.integers(240, 481, size=2))
    image = _SCENES[label](rng, width, height)
    return _add_noise(image, rng, sigma=float(rng.uniform(2, 8)))


def generate_set(per_class: int, seed: int) -> list[tuple[Image.Image, int]]:
    """``per_class`` images of every class, interleaved, reproducible from the seed."""
    rng = np.random.default_rng(seed)
    return [(generate(label, rng), index) for _ in range(per_class) for index, label in enumerate(LABELS)]


def _jitter(rng: np.random.Generator, color: Color, amount: int = 25) -> Color:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _gradient(rng: np.random.Generator, width: int, height: int, top: Color, bottom: Color) -> Image.Image:
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top_arr = np.array(_jitter(rng, top), dtype=np.float32)
    bottom_arr = np.array(_jitter(rng, bottom), dtype=np.float32)
    rows = top_arr * (1 - t) + bottom_arr * t
    return Image.fromarray(np.broadcast_to(rows, (height, width, 3)).astype(np.uint8))


def _add_noise(image: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, sigma, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _dots(draw: ImageDraw.ImageDraw, rng, width, height, count, radius, color: Color, highlight=False):
    for _ in range(count):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(*radius)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rng, color, 15))
        if highlight:
            h = max(r / 3, 1)
            draw.ellipse((x - r / 2 - h, y - r / 2 - h, x - r / 2 + h, y - r / 2 + h), fill=(255, 255, 255))


def _dew(rng, width, height):
    image = _gradient(rng, width, height, (40, 110, 40), (20, 70, 25))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 9))):  # blades of grass
        x = rng.uniform(0, width)
        draw.line(
            (x, height, x + rng.uniform(-60, 60), rng.uniform(0, height / 2)),
            fill=_jitter(rng, (60, 150, 50)),
            width=int(rng.integers(6, 16)),
        )
    _dots(draw, rng, width, height, int(rng.integers(40, 90)), (2, 6), (170, 210, 190), highlight=True)
    return image


def _fogsmog(rng, width, height):
    image = _gradient(rng, width, height, (190, 190, 185), (150, 150, 145))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):  # buildings or trees lost in the haze
        x = rng.uniform(0, width)
        w, h = rng.uniform(20, 70), rng.uniform(height * 0.2, height * 0.7)
        draw.rectangle((x, height - h, x + w, height), fill=_jitter(rng, (135, 135, 130), 10))
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(4, 9))))


def _frost(rng, width, height):
    image = _gradient(rng, width, height, (150, 185, 215), (100, 140, 185))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 12))):  # ice ferns: branching strokes
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        angle = rng.uniform(0, 2 * np.pi)
        for step in range(int(rng.integers(6, 12))):
            length = rng.uniform(8, 20)
            nx, ny = x + length * np.cos(angle), y + length * np.sin(angle)
            draw.line((x, y, nx, ny), fill=(235, 245, 255), width=2)
            side = angle + (np.pi / 3) * (1 if step % 2 else -1)
            draw.line((nx, ny, nx + 10 * np.cos(side), ny + 10 * np.sin(side)), fill=(220, 235, 250), width=1)
            x, y, angle = nx, ny, angle + rng.uniform(-0.3, 0.3)
    return image


def _glaze(rng, width, height):
    image = _gradient(rng, width, height, (60, 70, 90), (30, 35, 50))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 6))):  # ice-coated branches with specular streaks
        y = rng.uniform(0, height)
        thickness = int(rng.integers(8, 20))
        draw.line((0, y, width, y + rng.uniform(-80, 80)), fill=_jitter(rng, (120, 150, 180)), width=thickness)
        draw.line((0, y - thickness / 4, width, y + rng.uniform(-80, 80)), fill=(240, 248, 255), width=2)
    for _ in range(int(rng.integers(8, 20))):  # icicles
        x = rng.uniform(0, width)
        top = rng.uniform(0, height / 2)
        draw.polygon([(x - 4, top), (x + 4, top), (x, top + rng.uniform(30, 90))], fill=(200, 225, 245))
    return image


def _hail(rng, width, height):
    image = _gradient(rng, width, height, (120, 125, 130), (80, 85, 90))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, height * rng.uniform(0.7, 0.85), width, height), fill=_jitter(rng, (70, 95, 60)))
    _dots(draw, rng, width, height, int(rng.integers(25, 60)), (5, 12), (235, 238, 240), highlight=False)
    return image


def _lightning(rng, width, height):
    image = _gradient(rng, width, height, (30, 20, 60), (10, 10, 30))
    glow = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(glow)
    for _ in range(int(rng.integers(1, 3))):  # jagged bolts
        x, y = rng.uniform(width * 0.2, width * 0.8), 0.0
        while y < height:
            nx, ny = x + rng.uniform(-40, 40), y + rng.uniform(15, 45)
            draw.line((x, y, nx, ny), fill=(255, 255, 240), width=int(rng.integers(2, 5)))
            x, y = nx, ny
    halo = glow.filter(ImageFilter.GaussianBlur(6))
    return Image.fromarray(
        np.clip(np.asarray(image, np.int16) + np.asarray(halo, np.int16) + np.asarray(glow, np.int16), 0, 255).astype(
            np.uint8
        )
    )


def _rain(rng, width, height):
    image = _gradient(rng, width, height, (100, 110, 125), (60, 70, 85))
    draw = ImageDraw.Draw(image)
    slant = rng.uniform(-0.4, 0.4)
    for _ in range(int(rng.integers(150, 300))):  # streaks
        x, y = rng.uniform(-50, width + 50), rng.uniform(0, height)
        length = rng.uniform(15, 35)
        draw.line((x, y, x + slant * length, y + length), fill=_jitter(rng, (175, 185, 200), 15), width=1)
    return image


def _rainbow(rng, width, height):
    image = _gradient(rng, width, height, (90, 150, 220), (170, 200, 235))
    draw = ImageDraw.Draw(image)
    cx, cy = rng.uniform(0.2, 0.8) * width, height * rng.uniform(0.9, 1.3)
    radius = rng.uniform(0.5, 0.9) * max(width, height)
    band = rng.uniform(5, 10)
    colors = [(230, 50, 50), (240, 140, 40), (240, 230, 60), (60, 190, 70), (60, 90, 220), (130, 60, 190)]
    for i, color in enumerate(colors):
        r = radius - i * band
        draw.arc((cx - r, cy - r, cx + r, cy + r), 180, 360, fill=color, width=int(band) + 1)
    draw.rectangle((0, height * rng.uniform(0.8, 0.92), width, height), fill=_jitter(rng, (60, 120, 50)))
    return image


def _rime(rng, width, height):
    image = _gradient(rng, width, height, (170, 175, 180), (140, 145, 150))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):  # branches thickly coated on one side
        x = rng.uniform(0, width)
        end = (x + rng.uniform(-100, 100), rng.uniform(0, height / 3))
        draw.line((x, height, *end), fill=(70, 60, 55), width=int(rng.integers(4, 9)))
        for t in np.linspace(0, 1, 25):
            px, py = x + (end[0] - x) * t, height + (end[1] - height) * t
            r = rng.uniform(4, 10)
            draw.ellipse((px - r + 4, py - r, px + r + 4, py + r), fill=_jitter(rng, (245, 248, 250), 8))
    return image


def _sandstorm(rng, width, height):
    image = _gradient(rng, width, height, (200, 140, 70), (150, 95, 40))
    pixels = np.asarray(image, dtype=np.float32)
    # Blown sand: horizontal streaks of brightness.
    streaks = rng.normal(0, 18, size=(height, 1, 1)).astype(np.float32)
    pixels = pixels + np.repeat(streaks, width, axis=1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1, 3))))


def _snow(rng, width, height):
    image = _gradient(rng, width, height, (90, 100, 120), (150, 160, 175))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, height * rng.uniform(0.65, 0.85), width, height), fill=_jitter(rng, (240, 242, 248), 8))
    _dots(draw, rng, width, height, int(rng.integers(120, 250)), (1, 3), (250, 250, 252))
    return image


_SCENES = {
    "dew": _dew,
    "fogsmog": _fogsmog,
    "frost": _frost,
    "glaze": _glaze,
    "hail": _hail,
    "lightning": _lightning,
    "rain": _rain,
    "rainbow": _rainbow,
    "rime": _rime,
    "sandstorm": _sandstorm,
    "snow": _snow,
}
assert tuple(_SCENES) == LABELS
