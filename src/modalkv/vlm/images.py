"""Real photos for evaluating the mini-VLM (and the synthetic multimodal suite): crops of CC0 / public-domain photos
shipped by scikit-image, each with the words a correct answer contains. Sources and licenses: photos/LICENSE.md;
made by tools/make_minivlm_photos.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import Image


@dataclass(frozen=True, slots=True)
class Photo:
    """One photo of the set."""

    name: str
    subject: str  # what it shows, as a question would name it ("a cat")
    words: tuple[str, ...]  # an answer naming the photo is correct when it contains one of these (lower case)
    class_ids: tuple[int, ...]  # ImageNet classes that are a correct label for it (the vision tower's check)

    @property
    def path(self) -> Path:
        return Path(str(resources.files("modalkv.vlm").joinpath("photos", f"{self.name}.jpg")))

    def is_named_in(self, answer: str) -> bool:
        """Whether `answer` contains one of the accepted words."""
        return any(word in answer.lower() for word in self.words)


PHOTOS: dict[str, Photo] = {
    photo.name: photo
    for photo in [
        Photo("cat", "a cat", ("cat", "kitten", "tabby"), (281, 282, 285)),
        Photo("coffee", "a cup of coffee", ("coffee", "espresso", "cup"), (504, 967, 968)),
        Photo("rocket", "a rocket", ("rocket", "missile"), (657, 744)),
        Photo("space_shuttle", "a space shuttle", ("shuttle", "spacecraft", "spaceship"), (812,)),
        Photo("helmet", "a helmet", ("helmet",), (518, 560)),
        Photo("tripod", "a camera on a tripod", ("tripod", "camera", "photographer"), (759, 872)),
    ]
}


def load_photo(name: str, size: int | None = None) -> Image.Image:
    """The RGB photo `name` (a key of `PHOTOS`), as stored (longest side 448 px) or resized to size x size."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; photos: {', '.join(PHOTOS)}")
    image = Image.open(PHOTOS[name].path).convert("RGB")
    return image if size is None else image.resize((size, size), Image.Resampling.BICUBIC)
