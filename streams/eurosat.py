"""``eurosat``: EuroSAT (RGB) in torchvision's ``EuroSAT`` layout, with a seeded stratified split."""
from __future__ import annotations

from collections.abc import Hashable

from benchmark.registry import STREAMS
from streams.base import DATA_DIR, Split, StreamSpec
from streams.files import Sample
from streams.torchvision_root import DownloadSplitOptions, TorchvisionStream

LAYOUT = """\
<data_root>/eurosat/                     (torchvision.datasets.EuroSAT(root=<data_root>))
  2750/AnnualCrop/*.jpg
  2750/Forest/*.jpg
  ...                                    one folder per class (10)
  2750/SeaLake/*.jpg"""


@STREAMS.register("eurosat", options=DownloadSplitOptions)
class EuroSAT(TorchvisionStream):
    """EuroSAT land use, 10 classes; a seeded, stratified train/test split (in the run record)."""

    spec = StreamSpec.from_file(DATA_DIR / "eurosat.yaml")
    folder = "eurosat"
    layout = LAYOUT
    required = ("2750",)
    dataset_class = "EuroSAT"

    def scan_all(self) -> list[Sample]:
        # a missing or empty class folder: name it (torchvision would renumber or stop)
        self.class_folders(self.root / "2750", {k: k for k in self.spec.keys})
        return super().scan_all()

    def class_location(self, key: Hashable, split: Split) -> str:
        return f"images in {self.root / '2750' / str(key)}/"
