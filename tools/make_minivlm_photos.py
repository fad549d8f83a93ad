"""Makes the mini-VLM's photo set (src/modalkv/vlm/photos/) from the photos inside the scikit-image wheel.

    pip download --no-deps scikit-image==0.26.0 -d /tmp/skimage && python -m zipfile -e /tmp/skimage/*.whl /tmp/skimage
    python tools/make_minivlm_photos.py /tmp/skimage/skimage/data

Only photos whose docstring in skimage/data/_fetchers.py states CC0 or public domain are used (the license of each is
in photos/LICENSE.md). The crops are the regions the vision tower names correctly (checked by tests/test_minivlm.py).
"""

import sys
from pathlib import Path

from PIL import Image

# name -> (skimage file, crop box (left, top, right, bottom) or None)
CROPS = {
    "cat": ("chelsea.png", None),
    "coffee": ("coffee.png", (100, 0, 500, 400)),
    "rocket": ("rocket.jpg", (100, 0, 540, 427)),
    "space_shuttle": ("astronaut.png", (340, 0, 512, 300)),
    "helmet": ("astronaut.png", (270, 320, 512, 512)),
    "tripod": ("camera.png", (0, 100, 512, 512)),
}
MAX_SIDE = 448  # enough for the 448-px option; the default 224 px downsamples further


def main(data_dir: Path, out_dir: Path) -> None:
    for name, (filename, box) in CROPS.items():
        image = Image.open(data_dir / filename).convert("RGB")
        if box is not None:
            image = image.crop(box)
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        image.save(out_dir / f"{name}.jpg", quality=90)
        print(name, image.size)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parents[1] / "src" / "modalkv" / "vlm" / "photos")
