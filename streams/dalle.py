"""``dalle``: DALL-E 2 renders of TSI activities, a control set (every image is a test image)."""
from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

from streams.base import DATA_DIR, Split, StreamDataError, StreamSpec
from streams.files import FileStream, Sample, list_images

LAYOUT = """\
<data_root>/dalle/
  v2/<activity words joined by dashes>_<n>.png    e.g. v2/cutting-bread_3.png (or the PNGs
                                                  directly in dalle/)"""


class Dalle(FileStream):
    """DALL-E 2 images of 22 TSI activities; control only."""

    spec = StreamSpec.from_file(DATA_DIR / "dalle.yaml")
    folder = "dalle"
    layout = LAYOUT
    splits = ("test",)

    @property
    def images(self) -> Path:
        return self.root / "v2" if (self.root / "v2").is_dir() else self.root

    def scan(self, split: Split) -> list[Sample]:
        files = list_images(self.images, (".png",))
        if not files:
            raise StreamDataError(f"dalle: no .png images in {self.images}\nexpected layout:\n{self.layout}")
        return [self.sample(path, path.name.split("_")[0]) for path in files]

    def class_location(self, key: Hashable, split: Split) -> str:
        return f"images {self.images}/{key}_<n>.png"
