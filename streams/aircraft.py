"""``aircraft``: FGVC-Aircraft 2013b at the variant level, in torchvision's ``FGVCAircraft`` layout."""
from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any, ClassVar

from streams.base import DATA_DIR, Split, StreamSpec
from streams.torchvision_root import TorchvisionStream

LAYOUT = """\
<data_root>/fgvc-aircraft-2013b/         (torchvision.datasets.FGVCAircraft(root=<data_root>))
  data/variants.txt                      the 100 variant names, one a line
  data/images/<image id>.jpg
  data/images_variant_trainval.txt       train: '<image id> <variant>' per line
  data/images_variant_test.txt           test
  data/images_variant_train.txt          train with split: zscl (ZSCL trains on 'train', not 'trainval')
(or <data_root>/fgvc_aircraft/fgvc-aircraft-2013b/, the released code's folder)"""


class Aircraft(TorchvisionStream):
    """FGVC-Aircraft, 100 variants, torchvision's trainval/test split."""

    spec = StreamSpec.from_file(DATA_DIR / "aircraft.yaml")
    folder = "fgvc-aircraft-2013b"
    # the released code gives torchvision <dataroot>/fgvc_aircraft (its README says aircraft/)
    released_folders = ("fgvc_aircraft/fgvc-aircraft-2013b", "aircraft/fgvc-aircraft-2013b")
    layout = LAYOUT
    required = ("data/variants.txt", "data/images", "data/images_variant_trainval.txt",
                "data/images_variant_test.txt")
    dataset_class = "FGVCAircraft"
    split_args: ClassVar[dict[str, dict[str, Any]]] = {"train": {"split": "trainval", "annotation_level": "variant"},
                  "test": {"split": "test", "annotation_level": "variant"}}
    zscl_split_args: ClassVar[dict[str, dict[str, Any]]] = {"train": {"split": "train", "annotation_level": "variant"}}

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)
        if self.zscl:
            self.require(self.root / "data" / "images_variant_train.txt", "missing (split: zscl)")

    def class_location(self, key: Hashable, split: Split) -> str:
        listing = f"images_variant_{self.split_kwargs(split)['split']}.txt"
        return f"lines '<image id> {key}' in {self.root / 'data' / listing}"
