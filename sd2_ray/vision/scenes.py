"""Procedural scenes for the kit's vision-language target: coloured shapes in a 2×2 grid, drawn
with numpy, each with a caption and question–answer pairs built from its description.

Every answer needs the image: which shapes, their colours, where they are and how many. The
questions are the same for every scene, so a model without the image can learn the phrasing of
an answer but not its content: the gap MASSV's drafter closes. Deterministic for a seed; the
held-out split is a disjoint seeded stream of scenes (layouts repeat rarely: 4 cells × 15
shape-colours).
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32  # pixels a side; the grid's cells are 16 × 16
CELLS = ("top left", "top right", "bottom left", "bottom right")
SHAPES = ("square", "circle", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (165, 60, 205),
}
NUMBERS = ("no", "one", "two", "three", "four")
VISION = "vision"  # the prompt rows' category
IMAGE_PLACEHOLDER = "<image>"  # where a prompt's image goes (the VLM's image token)


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    cell: int


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]  # ordered by cell
    seed: int  # of the drawing's jitter

    def parts(self) -> list[str]:
        return [f"a {i.colour} {i.shape} at the {CELLS[i.cell]}" for i in self.items]

    def caption(self) -> str:
        """What an image–text pair says of the scene (the projector's pretraining text)."""
        return _sentence(_join(self.parts())) + "."

    def description(self) -> str:
        count = len(self.items)
        return f"There {_are(count)} {NUMBERS[count]} {_noun('shape', count)}: {_join(self.parts())}."


def _are(count: int) -> str:
    return "is" if count == 1 else "are"


def _noun(noun: str, count: int) -> str:
    return noun if count == 1 else noun + "s"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def random_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, 3)
    cells = sorted(rng.sample(range(len(CELLS)), count))
    items = tuple(Item(rng.choice(SHAPES), rng.choice(list(COLOURS)), c) for c in cells)
    return Scene(items, rng.randrange(2**31))


def draw(scene: Scene) -> np.ndarray:
    """The scene as an (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 image: each shape filled in its cell,
    with a seeded jitter of size, offset and colour, on a dark noisy background."""
    rng = np.random.default_rng(scene.seed)
    image = rng.integers(0, 30, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.int16)
    half = IMAGE_SIZE // 2
    ys, xs = np.mgrid[0:half, 0:half]
    for item in scene.items:
        size = int(rng.integers(10, 15))
        y0, x0 = (int(v) for v in rng.integers(0, half - size + 1, 2))
        mask = _mask(item.shape, ys - y0, xs - x0, size)
        colour = np.array(COLOURS[item.colour]) + rng.integers(-20, 21, 3)
        row, col = divmod(item.cell, 2)
        view = image[row * half : (row + 1) * half, col * half : (col + 1) * half]
        view[mask] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def _mask(shape: str, y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
    if shape == "square":
        return inside
    if shape == "circle":
        c = (size - 1) / 2
        return (y - c) ** 2 + (x - c) ** 2 <= (size / 2) ** 2
    # triangle, apex up: the row's half-width grows with its depth
    return inside & (np.abs(x - (size - 1) / 2) <= (y + 1) / 2)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: np.ndarray) -> str:
    """The image as a ``data:image/png;base64,...`` URL (how kit rows carry their images)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs about the scene; every answer depends on the image."""
    shapes = [i.shape for i in scene.items]
    pairs = [
        ("Describe the image.", scene.description()),
        (
            "How many shapes are there?",
            f"There {_are(len(shapes))} {NUMBERS[len(shapes)]} {_noun('shape', len(shapes))}.",
        ),
    ]
    for item in scene.items:
        if shapes.count(item.shape) == 1:
            pairs.append((f"What colour is the {item.shape}?", f"The {item.shape} is {item.colour}."))
    cell = rng.randrange(len(CELLS))
    found = [i for i in scene.items if i.cell == cell]
    where = CELLS[cell]
    pairs.append(
        (
            f"What is at the {where}?",
            f"A {found[0].colour} {found[0].shape} is at the {where}." if found else f"Nothing is at the {where}.",
        )
    )
    colour = rng.choice(list(COLOURS))
    n = sum(1 for i in scene.items if i.colour == colour)
    pairs.append(
        (
            f"How many {colour} shapes are there?",
            f"There {_are(n)} {NUMBERS[n]} {colour} {_noun('shape', n)}.",
        )
    )
    return pairs


def examples(count: int, seed: int, split: str) -> list[dict]:
    """``count`` prompt examples ``{key, category, messages, response, image, caption}`` of one
    split (train and eval draw from disjoint seeded streams), one question per scene, the
    questions in rotation so every kind is there; ``image`` is a PNG data URL."""
    rng = random.Random(f"{seed}-vision-{split}")
    out = []
    for index in range(count):
        scene = random_scene(rng)
        pairs = questions(scene, rng)
        question, answer = pairs[index % len(pairs)] if index % 3 else pairs[0]  # a third describe
        out.append(
            {
                "key": f"{split}-{index}",
                "category": VISION,
                "messages": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"}],
                "response": answer,
                "image": data_url(draw(scene)),
                "caption": scene.caption(),
            }
        )
    return out


def caption_rows(count: int, seed: int, split: str = "captions") -> list[dict]:
    """Image–caption pairs as prompt rows (the image alone as the prompt, the caption as the
    answer): a MASSV projector's phase-1 data."""
    return [
        {
            "id": f"vision-{split}-{i}",
            "category": VISION,
            "messages": [{"role": "user", "content": IMAGE_PLACEHOLDER}],
            "response": e["caption"],
            "image": e["image"],
        }
        for i, e in enumerate(examples(count, seed, split))
    ]
