"""The toy world's images: a 3x5 bitmap font of our own, one word per patch cell, and drawn shapes.

Images are IMAGE_SIZE px squares cut into PATCH_SIZE px patches (a 4 x 4 grid = 16 image tokens). Typographic images
write one word per patch cell, in reading order, so that a patch holds exactly one word and the vision tower +
projector can learn to put, at that image token, a vector the decoder reads like the word's text embedding. The font
is ours so that rendering does not depend on the fonts installed.

An image is described by a spec string ("words:<style>:<text>" or "shape:<shape>:<colour>:<background>:<jitter>")
that renders deterministically; records carry the spec, and `save_images` writes the PNGs.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64  # px, square
PATCH_SIZE = 16  # px: one word per patch cell
GRID = IMAGE_SIZE // PATCH_SIZE  # 4 x 4 cells = 16 image tokens
MAX_WORD_CHARS = 8  # a cell holds two lines of four 3x5 glyphs

COLOURS = {  # name -> RGB of a drawn shape
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20),
    "orange": (240, 130, 20), "purple": (140, 40, 170), "black": (10, 10, 10),
}
SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
BACKGROUNDS = {"white": (255, 255, 255), "grey": (200, 200, 200)}
INKS = [(0, 0, 0), (20, 20, 110), (110, 10, 10), (10, 80, 20)]  # text colours of typographic images
PAPERS = [(255, 255, 255), (250, 245, 215), (225, 235, 250), (235, 235, 235)]  # their backgrounds

GLYPHS_3X5 = {  # five rows of three pixels, '#' = ink
    "a": ".#.|#.#|###|#.#|#.#", "b": "##.|#.#|##.|#.#|##.", "c": ".##|#..|#..|#..|.##", "d": "##.|#.#|#.#|#.#|##.",
    "e": "###|#..|##.|#..|###", "f": "###|#..|##.|#..|#..", "g": ".##|#..|#.#|#.#|.##", "h": "#.#|#.#|###|#.#|#.#",
    "i": "###|.#.|.#.|.#.|###", "j": "..#|..#|..#|#.#|.#.", "k": "#.#|#.#|##.|#.#|#.#", "l": "#..|#..|#..|#..|###",
    "m": "#.#|###|###|#.#|#.#", "n": "##.|#.#|#.#|#.#|#.#", "o": ".#.|#.#|#.#|#.#|.#.", "p": "##.|#.#|##.|#..|#..",
    "q": ".#.|#.#|#.#|##.|.##", "r": "##.|#.#|##.|#.#|#.#", "s": ".##|#..|.#.|..#|##.", "t": "###|.#.|.#.|.#.|.#.",
    "u": "#.#|#.#|#.#|#.#|###", "v": "#.#|#.#|#.#|#.#|.#.", "w": "#.#|#.#|###|###|#.#", "x": "#.#|#.#|.#.|#.#|#.#",
    "y": "#.#|#.#|.#.|.#.|.#.", "z": "###|..#|.#.|#..|###",
    "0": "###|#.#|#.#|#.#|###", "1": ".#.|##.|.#.|.#.|###", "2": "##.|..#|.#.|#..|###", "3": "##.|..#|.#.|..#|##.",
    "4": "#.#|#.#|###|..#|..#", "5": "###|#..|##.|..#|##.", "6": ".##|#..|###|#.#|###", "7": "###|..#|.#.|.#.|.#.",
    "8": "###|#.#|###|#.#|###", "9": "###|#.#|###|..#|##.",
    ".": "...|...|...|...|.#.", ",": "...|...|...|.#.|#..", "?": "##.|..#|.#.|...|.#.", ":": "...|.#.|...|.#.|...",
    "'": ".#.|.#.|...|...|...", "-": "...|...|###|...|...",
}


def glyph(char: str) -> np.ndarray:
    if char not in GLYPHS_3X5:
        raise ValueError(f"toy font has no glyph for {char!r}")
    return np.array([[c == "#" for c in row] for row in GLYPHS_3X5[char].split("|")])  # (5, 3) bool


def word_cell_mask(word: str) -> np.ndarray:
    """(PATCH_SIZE, PATCH_SIZE) bool: the word in one patch cell, one line of <= 4 glyphs or two lines."""
    if not 0 < len(word) <= MAX_WORD_CHARS:
        raise ValueError(f"word {word!r} does not fit one image cell (1..{MAX_WORD_CHARS} characters)")
    lines = [word] if len(word) <= 4 else [word[:4], word[4:]]
    tops = [5] if len(lines) == 1 else [2, 9]
    mask = np.zeros((PATCH_SIZE, PATCH_SIZE), dtype=bool)
    for line, top in zip(lines, tops):
        left = (PATCH_SIZE - (4 * len(line) - 1)) // 2  # centred; glyphs 3 px wide, 1 px apart
        for i, char in enumerate(line):
            mask[top:top + 5, left + 4 * i:left + 4 * i + 3] = glyph(char)
    return mask


def render_words(text: str, style: int = 0) -> Image.Image:
    """Typographic image: the words of `text` one per patch cell, row by row; `style` picks ink and paper."""
    words = text.split()
    if not 0 < len(words) <= GRID * GRID:
        raise ValueError(f"{len(words)} words do not fit a {GRID}x{GRID} image: {text!r}")
    ink, paper = INKS[style % len(INKS)], PAPERS[(style // len(INKS)) % len(PAPERS)]
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[:] = paper
    for k, word in enumerate(words):
        row, col = divmod(k, GRID)
        cell = pixels[row * PATCH_SIZE:(row + 1) * PATCH_SIZE, col * PATCH_SIZE:(col + 1) * PATCH_SIZE]
        cell[word_cell_mask(word)] = ink
    return Image.fromarray(pixels, "RGB")


def render_shape(shape: str, colour: str, background: str, jitter: int = 0) -> Image.Image:
    """A filled shape in the middle of the image; `jitter` (0..8) moves and resizes it a little."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    cx, cy = 32 + jitter % 3 * 3 - 3, 32 + jitter // 3 * 3 - 3
    r = 18 + jitter % 4
    fill_rgb = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill_rgb)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill_rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill_rgb)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill_rgb)
    elif shape == "cross":
        w = r // 3
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill_rgb)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill_rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return image


def words_spec(text: str, style: int) -> str:
    return f"words:{style}:{text}"


def shape_spec(shape: str, colour: str, background: str, jitter: int) -> str:
    return f"shape:{shape}:{colour}:{background}:{jitter}"


@lru_cache(maxsize=4096)
def render_image(spec: str) -> Image.Image:
    """The image a spec describes (`words:<style>:<text>` or `shape:<shape>:<colour>:<background>:<jitter>`)."""
    kind, _, rest = spec.partition(":")
    if kind == "words":
        style, _, text = rest.partition(":")
        return render_words(text, int(style))
    if kind == "shape":
        shape, colour, background, jitter = rest.split(":")
        return render_shape(shape, colour, background, int(jitter))
    raise ValueError(f"unknown image spec {spec!r} (expected 'words:...' or 'shape:...')")


def image_filename(spec: str) -> str:
    return hashlib.sha256(spec.encode()).hexdigest()[:16] + ".png"


def save_images(specs, folder: Path) -> dict[str, str]:
    """Render each spec to folder/<hash>.png (kept if already there); returns spec -> file name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for spec in specs:
        if spec is None or spec in names:
            continue
        names[spec] = image_filename(spec)
        path = folder / names[spec]
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            render_image(spec).save(tmp, format="PNG")
            os.replace(tmp, path)  # atomic: concurrent writers never expose a half-written file
    return names
