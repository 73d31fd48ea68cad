"""``eurosat``: EuroSAT (RGB) in torchvision's ``EuroSAT`` layout; the released split file or a seeded split."""
from __future__ import annotations

from collections.abc import Hashable
from numbers import Integral
from pathlib import Path, PurePath

from streams.base import DATA_DIR, Split, StreamSpec
from streams.files import Sample, load_pickle, malformed
from streams.options import EuroSATOptions  # noqa: F401  (re-exported)
from streams.torchvision_root import TorchvisionStream

SPLIT_FILE = "eurosat_split.pkl"
LAYOUT = f"""\
<data_root>/eurosat/                     (torchvision.datasets.EuroSAT(root=<data_root>))
  2750/AnnualCrop/*.jpg
  2750/Forest/*.jpg
  ...                                    one folder per class (10)
  2750/SeaLake/*.jpg
  {SPLIT_FILE}                      optional: the released code's fixed train/test split"""
SPLIT_FORMAT = ("a pickled dict {'train': [(image path, label), ...], 'test': [...]}, as the released code reads it: "
                "each path ends in '<class folder>/<file name>' (e.g. '.../AnnualCrop/AnnualCrop_1.jpg'), each label "
                "is that folder's index among the 10 sorted class folders")


class EuroSAT(TorchvisionStream):
    """EuroSAT land use, 10 classes; the released split file when present, else a seeded stratified split."""

    spec = StreamSpec.from_file(DATA_DIR / "eurosat.yaml")
    folder = "eurosat"
    layout = LAYOUT
    required = ("2750",)
    dataset_class = "EuroSAT"
    released_split_file = SPLIT_FILE

    def scan_all(self) -> list[Sample]:
        # listed here, not by torchvision: a missing or empty class folder is named (torchvision would
        # renumber or stop), a hidden folder is not a class, any other folder is refused as unknown
        return self.class_folders(self.root / "2750", {k: k for k in self.spec.keys}, others=True)

    def read_split_file(self, path: Path, samples: list[Sample]) -> dict[Split, list[str]]:
        """Our ids (``2750/<class folder>/<file name>``) of the images each part of the file lists."""
        data = load_pickle(path, "eurosat", SPLIT_FORMAT)
        if not isinstance(data, dict) or not {"train", "test"} <= data.keys():
            raise malformed("eurosat", path, f"not a dict with keys 'train' and 'test' ({type(data).__name__})",
                            SPLIT_FORMAT)
        labels = self.spec.key_index()
        parts: dict[Split, list[str]] = {}
        for part in ("train", "test"):
            entries = data[part]
            if not isinstance(entries, (list, tuple)):
                raise malformed("eurosat", path, f"'{part}' is a {type(entries).__name__}, not a list", SPLIT_FORMAT)
            parts[part] = [self._entry_id(path, part, i, entry, labels) for i, entry in enumerate(entries)]
        return parts

    def _entry_id(self, path: Path, part: str, i: int, entry: object, labels: dict[Hashable, int]) -> str:
        """Our id of entry ``i`` of ``part``, checked: a (path, label) pair whose label is its folder's."""
        where = f"'{part}' entry {i} {entry!r}"
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], Integral)):
            raise malformed("eurosat", path, f"{where} is not an (image path, label) pair", SPLIT_FORMAT)
        parents = PurePath(str(entry[0])).parts
        folder = parents[-2] if len(parents) >= 2 else ""
        if labels.get(folder) != int(entry[1]):
            raise malformed("eurosat", path, f"{where}: label {int(entry[1])} is not that of a class folder "
                            f"'{folder}' (labels: {labels})", SPLIT_FORMAT)
        return f"2750/{folder}/{parents[-1]}"

    def class_location(self, key: Hashable, split: Split) -> str:
        return f"images in {self.root / '2750' / str(key)}/"
