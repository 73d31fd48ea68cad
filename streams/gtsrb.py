"""``gtsrb``: the German Traffic Sign Recognition Benchmark in torchvision's ``GTSRB`` layout."""
from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any, ClassVar

from streams.base import DATA_DIR, Split, StreamSpec
from streams.torchvision_root import TorchvisionStream

LAYOUT = """\
<data_root>/gtsrb/                       (torchvision.datasets.GTSRB(root=<data_root>))
  GTSRB/Training/00000/*.ppm ... GTSRB/Training/00042/*.ppm    train: one folder per class
  GTSRB/Final_Test/Images/*.ppm                                test images
  GT-final_test.csv                      test labels: 'Filename;...;ClassId' (';'-separated)"""


class GTSRB(TorchvisionStream):
    """GTSRB traffic signs, 43 classes, torchvision's train/test split."""

    spec = StreamSpec.from_file(DATA_DIR / "gtsrb.yaml")
    folder = "gtsrb"
    layout = LAYOUT
    required = ("GTSRB/Training", "GTSRB/Final_Test/Images", "GT-final_test.csv")
    dataset_class = "GTSRB"
    split_args: ClassVar[dict[str, dict[str, Any]]] = {"train": {"split": "train"}, "test": {"split": "test"}}

    def files_and_labels(self, ds: Any) -> list[tuple[Path, int]]:
        return [(Path(p), int(y)) for p, y in ds._samples]  # torchvision keeps them here, no public accessor

    def key(self, ds: Any, path: Path, label: int) -> Hashable:
        return label  # the ClassId column of the test CSV (the training folders are listed by scan())

    def scan(self, split: Split):
        if split == "train":
            # listed here, not by torchvision: a missing or empty class folder is named (torchvision would
            # renumber or stop), a hidden folder is not a class, any other folder is refused as unknown
            return self.class_folders(self.root / "GTSRB" / "Training",
                                      {k: f"{k:05d}" for k in self.spec.keys}, extensions=(".ppm",), others=True)
        return super().scan(split)

    def class_location(self, key: Hashable, split: Split) -> str:
        if split == "train":
            return f"images in {self.root / 'GTSRB' / 'Training' / f'{key:05d}'}/*.ppm"
        return f"rows with ClassId {key} in {self.root / 'GT-final_test.csv'}"
