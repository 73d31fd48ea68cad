"""``counteranimal``: CounterAnimal's LAION-final images of animals on uncommon backgrounds."""
from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

from benchmark.registry import STREAMS
from streams.base import DATA_DIR, Split, StreamDataError, StreamSpec
from streams.files import FileStream, Sample, SplitOptions, list_images

LAYOUT = """\
<data_root>/counteranimal/
  LAION-final/<imagenet id> <name>/      one folder per class (45), e.g. '9 ostrich'
    common-<background>/*.jpg            the class on its common background (not used)
    counter-<background>/*.jpg           the class on an uncommon background: the stream's images"""


@STREAMS.register("counteranimal", options=SplitOptions)
class CounterAnimal(FileStream):
    """CounterAnimal, 45 ImageNet animal classes on counter (uncommon) backgrounds; seeded split."""

    spec = StreamSpec.from_file(DATA_DIR / "counteranimal.yaml")
    folder = "counteranimal"
    layout = LAYOUT
    required = ("LAION-final",)

    def class_dirs(self) -> dict[Hashable, Path]:
        """ImageNet id (or the folder name when it starts with none) → class folder."""
        dirs: dict[Hashable, Path] = {}
        for path in sorted((self.root / "LAION-final").iterdir()):
            if path.is_dir():
                head = path.name.split(" ", 1)[0]
                dirs[int(head) if head.isdigit() else path.name] = path
        return dirs

    def scan_all(self) -> list[Sample]:
        dirs = self.class_dirs()
        samples: list[Sample] = []
        for label, key in enumerate(self.spec.keys):
            if key not in dirs:
                raise StreamDataError(
                    f"counteranimal: class folder missing: {self.root / 'LAION-final'}/{key} <name> "
                    f"(ImageNet class {key}, {self.spec.class_names[label]!r})\nexpected layout:\n{self.layout}")
        for key, path in dirs.items():
            counters = [d for d in sorted(path.iterdir()) if d.is_dir() and d.name.startswith("counter")]
            if not counters:
                raise StreamDataError(f"counteranimal: no counter-* folder in {path}\nexpected layout:\n{self.layout}")
            files = [f for folder in counters for f in list_images(folder)]
            if not files:
                raise StreamDataError(f"counteranimal: empty class folder (no images): {counters[0]}\n"
                                      f"expected layout:\n{self.layout}")
            samples += [self.sample(f, key) for f in files]
        return samples

    def class_location(self, key: Hashable, split: Split) -> str:
        return f"images in {self.root / 'LAION-final'}/{key} <name>/counter-*/"
