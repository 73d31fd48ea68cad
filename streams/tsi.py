"""``tsi``: Toyota Smarthome Images, frames of daily activities split by subject."""
from __future__ import annotations

from collections.abc import Hashable
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import yaml

from streams.base import DATA_DIR, Split, StreamDataError, StreamSpec
from streams.files import FileStream, Sample, list_images, load_pickle, malformed
from streams.options import TSI_CAPTIONS_FILE as CAPTIONS_FILE
from streams.options import TSIOptions

DATA_FILE = DATA_DIR / "tsi.yaml"
CAPTIONS_FORMAT = "a pickled dict {frame file name: caption text}, e.g. {'<Action>_<pXX>_<...>.jpg': '<caption>', ...}"
IMAGE_FOLDERS = ("images_trunc", "images")
LAYOUT = f"""\
<data_root>/tsi/                         (or toyota_smarthome_images/, the released code's name)
  images_trunc/<Action>_<pXX>_<...>.jpg  frames named by action and subject (or images/)
  {CAPTIONS_FILE}   optional: frame file name -> caption (training captions)"""


class TSI(FileStream):
    """Toyota Smarthome Images, 27 activities; train and test subjects as in the paper."""

    spec = StreamSpec.from_file(DATA_FILE)
    folder = "tsi"
    released_folders = ("toyota_smarthome_images",)
    layout = LAYOUT
    subjects: ClassVar[dict[Split, frozenset[str]]] = {
        split: frozenset(yaml.safe_load(DATA_FILE.read_text())[f"{split}_subjects"]) for split in ("train", "test")}

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)
        found = [self.root / name for name in IMAGE_FOLDERS if (self.root / name).is_dir()]
        if not found:
            self.require(self.root / IMAGE_FOLDERS[0], f"image folder missing ({' or '.join(IMAGE_FOLDERS)})")
        self.images = found[0]
        if (options or TSIOptions()).captions is True:
            self.require(self.root / CAPTIONS_FILE, "captions file missing (tsi.captions: true)")

    @cached_property
    def frames(self) -> list[tuple[Path, str, str]]:
        """(file, action, subject) of every frame of the image folder (hidden files ignored); every
        badly named frame is counted in one error, with the first few named."""
        frames, bad = [], []
        for path in list_images(self.images):
            parts = path.name.split("_")
            if len(parts) < 3 or not parts[1].startswith("p"):
                bad.append(path)
            else:
                frames.append((path, parts[0], parts[1]))
        if bad:
            shown = "\n  ".join(map(str, bad[:5]))
            raise StreamDataError(f"tsi: {len(bad)} frame(s) not named '<Action>_<pXX>_...'"
                                  f"{', e.g.' if len(bad) > 5 else ':'}\n  {shown}\nexpected layout:\n{self.layout}")
        return frames

    def scan(self, split: Split) -> list[Sample]:
        """Frames of the split's subjects; frames of other subjects are not used."""
        return [self.sample(path, action) for path, action, subject in self.frames if subject in self.subjects[split]]

    @cached_property
    def caption_table(self) -> dict[str, str] | None:
        """The release's frame file name → caption table, or None when it is absent or not wanted."""
        path = self.root / CAPTIONS_FILE
        if (self.options or TSIOptions()).captions is False or not path.is_file():
            return None
        table = load_pickle(path, "tsi", CAPTIONS_FORMAT)
        if not isinstance(table, dict):
            raise malformed("tsi", path, f"a {type(table).__name__}, not a dict", CAPTIONS_FORMAT)
        bad = next(((k, v) for k, v in table.items() if not (isinstance(k, str) and isinstance(v, str))), None)
        if bad is not None:
            raise malformed("tsi", path, f"entry {bad[0]!r}: {bad[1]!r} is not file name -> caption text", CAPTIONS_FORMAT)
        return table

    def text_sources(self) -> dict[str, str]:
        return {"captions": str(self.root / CAPTIONS_FILE)} if self.caption_table is not None else {}

    def captions_for(self, split: Split, samples: list[Sample]) -> list[str] | None:
        table = self.caption_table
        if split != "train" or table is None:
            return None
        missing = [s.item for s in samples if s.item.name not in table]
        if missing:
            raise StreamDataError(f"tsi: {len(missing)} training frame(s) have no caption in "
                                  f"{self.root / CAPTIONS_FILE}, e.g. {missing[0]}")
        return [table[s.item.name] for s in samples]

    def class_location(self, key: Hashable, split: Split) -> str:
        subjects = ",".join(sorted(self.subjects[split]))
        return f"frames {self.images}/{key}_<pXX>_*.jpg of subjects {subjects}"
