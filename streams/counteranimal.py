"""``counteranimal``: CounterAnimal's LAION-final images of animals on uncommon backgrounds.

As in the released code, the class names come from the dataset's own
``LAION-final/imagenet_names.txt`` when it is there (``class_names: clip`` keeps CLIP's
ImageNet names of the data file), and the split from its ``counter_animal_ds.pkl`` when it
is there (else a seeded, stratified split).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from streams.base import DATA_DIR, Split, StreamDataError, StreamSpec
from streams.files import FileStream, Sample, list_folders, list_images, load_pickle, malformed
from streams.options import COUNTERANIMAL_NAMES_FILE as NAMES_FILE
from streams.options import CounterAnimalOptions

SPLIT_FILE = "LAION-final/counter_animal_ds.pkl"
LAYOUT = f"""\
<data_root>/counteranimal/
  LAION-final/<imagenet id> <name>/      one folder per class (45), e.g. '9 ostrich'
    common-<background>/*.jpg            the class on its common background (not used)
    counter-<background>/*.jpg           the class on an uncommon background: the stream's images
  {NAMES_FILE}        optional: ImageNet class names, line i = class i, name in the last tab field
  {SPLIT_FILE}    optional: the released code's fixed train/test split"""
NAMES_FORMAT = ("one line per ImageNet class in class-index order (line i names class i, as the released code "
                "reads it), the name in the last tab-separated field, e.g. '9\\tostrich, Struthio camelus'; "
                "a leading number, when there is one, must be the line's index")
SPLIT_FORMAT = ("a pickled dict {'train_ds': {class folder: [file name, ...]}, 'test_ds': {...}}, as the released "
                "code reads it: class folders named as in LAION-final ('9 ostrich'), file names of images in that "
                "folder's counter-* folder")


def read_imagenet_names(path: Path, ids: Sequence[int]) -> tuple[str, ...]:
    """Names of ImageNet classes ``ids`` in an ``imagenet_names.txt`` (format: NAMES_FORMAT)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise StreamDataError(f"counteranimal: cannot read {path}: {err}\nexpected: {NAMES_FORMAT}") from err
    for i, line in enumerate(lines):
        head = line.split("\t", 1)[0].strip()
        if "\t" in line and head.isdigit() and int(head) != i:
            raise malformed("counteranimal", path, f"line {i + 1} is numbered {head}, not {i}", NAMES_FORMAT)
    names = {k: lines[k].split("\t")[-1].rstrip() for k in ids if k < len(lines)}
    unnamed = [k for k in ids if not names.get(k)]
    if unnamed:
        raise malformed("counteranimal", path, f"no name for ImageNet class(es) {unnamed[:5]} "
                        f"({len(lines)} lines)", NAMES_FORMAT)
    return tuple(names[k] for k in ids)


class CounterAnimal(FileStream):
    """CounterAnimal, 45 ImageNet animal classes on counter (uncommon) backgrounds; released or seeded split."""

    spec = StreamSpec.from_file(DATA_DIR / "counteranimal.yaml")
    folder = "counteranimal"
    layout = LAYOUT
    required = ("LAION-final",)
    released_split_file = SPLIT_FILE

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)
        names = self.root / NAMES_FILE
        self.names_file = names if (options or CounterAnimalOptions()).class_names == "dataset" and names.is_file() else None
        if self.names_file is not None:
            self.spec = replace(self.spec, class_names=read_imagenet_names(self.names_file, self.spec.keys))

    def text_sources(self) -> dict[str, str]:
        return {"class_names": str(self.names_file)} if self.names_file is not None else {}

    def class_dirs(self) -> dict[Hashable, Path]:
        """ImageNet id (or the folder name when it starts with none) → class folder (hidden folders ignored)."""
        dirs: dict[Hashable, Path] = {}
        for path in list_folders(self.root / "LAION-final"):
            head = path.name.split(" ", 1)[0]
            dirs[int(head) if head.isdigit() else path.name] = path
        return dirs

    def scan_all(self) -> list[Sample]:
        dirs = self.class_dirs()
        problems = [f"counteranimal: class folder missing: {self.root / 'LAION-final'}/{key} <name> "
                    f"(ImageNet class {key}, {self.spec.class_names[label]!r})"
                    for label, key in enumerate(self.spec.keys) if key not in dirs]
        samples: list[Sample] = []
        for key, path in dirs.items():
            counters = [d for d in list_folders(path) if d.name.startswith("counter")]
            if not counters:
                problems.append(f"counteranimal: no counter-* folder in {path}")
                continue
            files = [f for folder in counters for f in list_images(folder)]
            if not files:
                problems.append(f"counteranimal: empty class folder (no images): {counters[0]}")
            samples += [self.sample(f, key) for f in files]
        if problems:
            raise StreamDataError("\n".join([*problems, f"expected layout:\n{self.layout}"]))
        return samples

    def read_split_file(self, path: Path, samples: list[Sample]) -> dict[Split, list[str]]:
        """Our ids of the images each part lists; a file name is looked up in its class's counter-*
        folders (the first in sorted order that holds it)."""
        data = load_pickle(path, "counteranimal", SPLIT_FORMAT)
        if not isinstance(data, dict) or not {"train_ds", "test_ds"} <= data.keys():
            raise malformed("counteranimal", path, f"not a dict with keys 'train_ds' and 'test_ds' "
                            f"({type(data).__name__})", SPLIT_FORMAT)
        found: dict[tuple[str, str], str] = {}
        for s in samples:
            found.setdefault((s.item.parent.parent.name, s.item.name), s.id)
        parts: dict[Split, list[str]] = {}
        for part, key in (("train", "train_ds"), ("test", "test_ds")):
            table = data[key]
            if not (isinstance(table, dict) and all(
                    isinstance(folder, str) and isinstance(files, (list, tuple)) and all(isinstance(f, str) for f in files)
                    for folder, files in table.items())):
                raise malformed("counteranimal", path, f"'{key}' is not a dict of class folder -> list of file names",
                                SPLIT_FORMAT)
            parts[part] = [found.get((folder, name), f"LAION-final/{folder}/counter-*/{name}")
                           for folder, files in table.items() for name in files]
        return parts

    def class_location(self, key: Hashable, split: Split) -> str:
        return f"images in {self.root / 'LAION-final'}/{key} <name>/counter-*/"
