"""Options of the streams: the dataclasses of their config sections (``gtsrb: {download: true}``).

Kept apart from the loaders (which need torch) so that the CLI can print and check them
without loading any data. Every field carries its help text (``fscl ls streams -v``); values
are checked once, in ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from benchmark.config import check

TSI_CAPTIONS_FILE = "images_text_description_short_trunc.pkl"  # under the stream's folder
COUNTERANIMAL_NAMES_FILE = "LAION-final/imagenet_names.txt"  # under the stream's folder
HM_SESSION_FILE = "data_per_session.pkl"  # under the stream's folder


# --------------------------------------------------------------------------- shared
@dataclass
class SplitOptions:
    """Options of a stream without an official train/test split (a seeded, stratified one)."""

    test_fraction: float = field(default=0.2, metadata={
        "help": "share of every class's images that goes to the test split"})
    split_seed: int = field(default=0, metadata={"help": "seed of the stratified split"})

    def __post_init__(self) -> None:
        check(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "a float in (0, 1)")
        check(self.split_seed >= 0, "split_seed", self.split_seed, "an integer >= 0")


@dataclass
class SplitFileOptions(SplitOptions):
    """Options of a stream whose released code reads a fixed split file; the seeded split is the fallback."""

    split_file: str | None = field(default="auto", metadata={"help": (
        "the fixed train/test split in the released code's format: 'auto' reads the file when it lies where the "
        "released code keeps it in the stream's folder and takes the seeded split otherwise; a path (absolute, or "
        "relative to the stream's folder) must exist; null always takes the seeded split")})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.split_file is None or bool(self.split_file.strip()), "split_file", self.split_file,
              "'auto', the path of a split file, or null (the seeded split)")


@dataclass
class DownloadOptions:
    """Options of a torchvision-read stream with an official split."""

    download: bool = field(default=False, metadata={
        "help": "let torchvision download the dataset into data_root when it is missing"})


@dataclass
class DownloadSplitOptions(SplitOptions):
    """Options of a torchvision-read stream without an official split (a seeded one)."""

    download: bool = field(default=False, metadata={
        "help": "let torchvision download the dataset into data_root when it is missing"})


@dataclass
class ZSCLSplitOptions:
    """The split choice of a stream whose split in ZSCL's MTIL code (``Thunderbeee/ZSCL``) differs from ours."""

    split: str = field(default="suite", metadata={"help": (
        "'suite': the stream's own split; 'zscl': the split ZSCL's MTIL code uses (docs/fidelity.md, "
        "'MTIL datasets'), whatever the other split options say")})

    def __post_init__(self) -> None:
        inherited = getattr(super(), "__post_init__", None)  # the checks of the options it is mixed into
        if inherited is not None:
            inherited()
        check(self.split in ("suite", "zscl"), "split", self.split, "suite | zscl")


@dataclass
class AircraftOptions(ZSCLSplitOptions, DownloadOptions):
    """Options of ``aircraft``: download, and the split (ZSCL trains on the 'train' part only, ours on 'trainval')."""


@dataclass
class DownloadZSCLSplitOptions(ZSCLSplitOptions, DownloadSplitOptions):
    """Options of a torchvision-read stream without an official split: the seeded split or ZSCL's."""


@dataclass
class ChecksumOptions(DownloadOptions):
    """Options of a torchvision class that verifies its files' MD5 sums when it reads them."""

    verify_checksums: bool = field(default=True, metadata={
        "help": "false: accept a copy whose files differ from the released ones"})


# --------------------------------------------------------------------------- one stream each
@dataclass
class CounterAnimalOptions(SplitFileOptions):
    """Options of ``counteranimal``: class names and the split (split_file, else test_fraction and split_seed)."""

    class_names: str = field(default="dataset", metadata={"help": (
        f"'dataset': the names of the dataset's {COUNTERANIMAL_NAMES_FILE} when it is there (as the released code), "
        "CLIP's ImageNet names otherwise; 'clip': always CLIP's ImageNet names (the stream's data file)")})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.class_names in ("dataset", "clip"), "counteranimal.class_names", self.class_names, "dataset | clip")


@dataclass
class DigitsOptions:
    """Options of the ``digits`` stream."""

    test_fraction: float = field(default=0.3, metadata={"help": "test share of the stratified, seeded split"})
    split_seed: int = field(default=0, metadata={"help": "seed of the split"})

    def __post_init__(self) -> None:
        check(0 < self.test_fraction < 1, "digits.test_fraction", self.test_fraction, "a float in (0, 1)")


@dataclass
class EuroSATOptions(ZSCLSplitOptions, SplitFileOptions, DownloadOptions):
    """Options of ``eurosat``: the split (split_file, else test_fraction and split_seed; or ZSCL's) and download."""


@dataclass
class HMOptions:
    """Options of ``hm`` (Hateful Memes): where its five sessions' rows come from."""

    session_file: str | None = field(default="auto", metadata={"help": (
        f"the released session file ({HM_SESSION_FILE}: five lists of row indices into train.jsonl): 'auto' reads it "
        "when it lies in the stream's folder and takes the seeded split otherwise; a path (absolute, or relative to "
        "the stream's folder) must exist; null always takes the seeded split")})
    session_seed: int = field(default=0, metadata={"help": (
        "seed of the label-stratified five-way split of train.jsonl used when there is no session file")})

    def __post_init__(self) -> None:
        check(self.session_file is None or bool(self.session_file.strip()), "hm.session_file", self.session_file,
              "'auto', the path of a session file, or null (the seeded split)")
        check(self.session_seed >= 0, "hm.session_seed", self.session_seed, "an integer >= 0")


@dataclass
class ImageFolderOptions(SplitOptions):
    """Options of the ``imagefolder`` control."""

    root: str = field(default="", metadata={"help": "the folder of class folders: absolute, or relative to data_root"})
    class_names: str = field(default="", metadata={
        "help": "file of class names ('<folder> <name>' lines, one name a line, or JSON); empty: the folder names"})
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."], metadata={
        "help": "prompt templates, '{}' standing for the class name"})
    test_fraction: float = field(default=1.0, metadata={
        "help": "1: every image is a test image; below 1: a seeded split"})

    def __post_init__(self) -> None:
        check(bool(self.root), "imagefolder.root", self.root, "the folder of class folders")
        check(0 < self.test_fraction <= 1, "imagefolder.test_fraction", self.test_fraction, "a float in (0, 1]")
        check(self.split_seed >= 0, "imagefolder.split_seed", self.split_seed, "an integer >= 0")
        check(bool(self.templates) and all("{}" in t for t in self.templates), "imagefolder.templates",
              self.templates, "a non-empty list of strings with '{}' for the class name")


@dataclass
class MMVPOptions:
    """Options of ``mmvp``."""

    corrected_labels: bool = field(default=False, metadata={"help": (
        "true: fix the two pairs whose labels the MMVP issues 14 and 30 found swapped (Index 99/100, 279/280: "
        "99 (b), 100 (a), 279 (b), 280 (a)); false (default): the released labels, as the paper's numbers used")})

    def __post_init__(self) -> None:
        check(isinstance(self.corrected_labels, bool), "mmvp.corrected_labels", self.corrected_labels, "true | false")


@dataclass
class TSIOptions:
    """Options of the ``tsi`` stream."""

    captions: bool | str = field(default="auto", metadata={"help": (
        f"train on the release's per-frame captions ({TSI_CAPTIONS_FILE}) instead of the class templates, as the "
        "released code does: 'auto' when the file is there, true requires it, false never")})

    def __post_init__(self) -> None:
        check(isinstance(self.captions, bool) or self.captions == "auto", "tsi.captions", self.captions,
              "auto | true | false")


# --------------------------------------------------------------------------- the mini world
@dataclass
class MiniOptions:
    """Options of a procedural mini stream (images per class of each split, data seed)."""

    train_per_class: int = field(default=50, metadata={"help": "training images rendered per class"})
    test_per_class: int = field(default=30, metadata={"help": "test images rendered per class"})
    seed: int = field(default=0, metadata={"help": "seed of the rendered images"})

    def __post_init__(self) -> None:
        check(self.train_per_class >= 1, "train_per_class", self.train_per_class, "an integer >= 1")
        check(self.test_per_class >= 1, "test_per_class", self.test_per_class, "an integer >= 1")
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")


# --------------------------------------------------------------------------- sequences
@dataclass
class DatasetOptions:
    """The options of a sequence's datasets (each a registered stream's own section)."""

    section: ClassVar[str] = "sequence"  # the config section, in error messages

    dataset_options: dict = field(default_factory=dict, metadata={
        "help": "options of its datasets by name, each that stream's own section (e.g. {cifar100: "
                "{verify_checksums: false}}); a dataset not named takes its stream's defaults"})

    def __post_init__(self) -> None:
        from benchmark.registry import STREAMS

        key = f"{self.section}.dataset_options"
        check(isinstance(self.dataset_options, dict), key, self.dataset_options, "a mapping of dataset -> options")
        for name, section in self.dataset_options.items():
            check(name in STREAMS and STREAMS.get(name).options is not None and isinstance(section, dict), key,
                  name, "registered streams that take options, each with a mapping of its options")
            try:
                STREAMS.get(name).options(**section)
            except TypeError as err:
                check(False, f"{key}.{name}", section, f"that stream's options ({err})")

    def of(self, name: str, default: Any) -> Any:
        """Dataset ``name``'s options: ``default`` (its stream's defaults, or a sequence's own) with those given."""
        given = self.dataset_options.get(name, {})
        return dataclasses.replace(default, **given) if given and default is not None else default


@dataclass
class SequenceOptions(DatasetOptions):
    """Options of ``sequence``: the datasets its sessions train, in order (MTIL's protocol, streams.sequence)."""

    datasets: list[str] = field(default_factory=list, metadata={
        "help": "registered streams of labelled classes, one per session in this order (at least two, distinct); "
                "each is evaluated among its own classes after every session"})

    def __post_init__(self) -> None:
        from benchmark.registry import STREAMS

        check(isinstance(self.datasets, list) and len(self.datasets) >= 2
              and len(set(map(str, self.datasets))) == len(self.datasets), "sequence.datasets", self.datasets,
              "a list of at least two distinct registered streams")
        unknown = [name for name in self.datasets if name not in STREAMS]
        check(not unknown, "sequence.datasets", self.datasets,
              "registered streams (fscl ls streams); " + "; ".join(STREAMS.unknown_message(n) for n in unknown))
        super().__post_init__()


@dataclass
class MTILOptions(DatasetOptions):
    """Options of ``mtil``: ZSCL's order of the eleven datasets, whose splits, and its datasets' own options."""

    section: ClassVar[str] = "mtil"

    order: str = field(default="I", metadata={"help": "ZSCL's Order I (aircraft first) or II (stanfordcars first)"})
    split: str = field(default="zscl", metadata={"help": (
        "'zscl': each dataset's split in ZSCL's code where ours differs (the datasets' option split: zscl); "
        "'suite': the suite's own splits")})

    def __post_init__(self) -> None:
        check(self.order in ("I", "II"), "mtil.order", self.order, "I | II")
        check(self.split in ("zscl", "suite"), "mtil.split", self.split, "zscl | suite")
        super().__post_init__()
