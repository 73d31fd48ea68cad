"""Data streams: one module per stream (spec data + on-disk loader), sampling, the mini world.

Every stream is declared here by name (the mini world's in :mod:`streams.mini`), so that
``fscl ls`` and config checks know them without importing torch; a stream's module is
imported when it is first used. Options: :mod:`streams.options`. The names below are
imported on first use as well.
"""
from benchmark.lazy import lazy_exports
from benchmark.registry import STREAMS
from streams import mini  # noqa: F401  (declares the mini world's streams and backbone family)

__all__ = ["FewShotSampler", "LabelledImages", "Session", "Stream", "StreamDataError", "StreamSpec"]
__getattr__ = lazy_exports(__name__, {"FewShotSampler": "streams.sampling", "Session": "streams.sampling",
                                      **dict.fromkeys(["LabelledImages", "Stream", "StreamDataError", "StreamSpec"],
                                                      "streams.base")})

_DOWNLOAD, _SPLIT, _CHECKSUM = ("streams.options:DownloadOptions", "streams.options:DownloadZSCLSplitOptions",
                                "streams.options:ChecksumOptions")
# the paper's targets
STREAMS.declare("tsi", "streams.tsi:TSI", options="streams.options:TSIOptions",
                summary="Toyota Smarthome Images, 27 activities; train and test subjects as in the paper.")
STREAMS.declare("gtsrb", "streams.gtsrb:GTSRB", options=_DOWNLOAD,
                summary="GTSRB traffic signs, 43 classes, torchvision's train/test split.")
STREAMS.declare("aircraft", "streams.aircraft:Aircraft", options="streams.options:AircraftOptions",
                summary="FGVC-Aircraft, 100 variants, torchvision's trainval/test split.")
STREAMS.declare("counteranimal", "streams.counteranimal:CounterAnimal", options="streams.options:CounterAnimalOptions",
                summary="CounterAnimal, 45 ImageNet animal classes on counter (uncommon) backgrounds; "
                        "released or seeded split.")
STREAMS.declare("eurosat", "streams.eurosat:EuroSAT", options="streams.options:EuroSATOptions",
                summary="EuroSAT land use, 10 classes; the released split file when present, "
                        "else a seeded stratified split.")
# the paper's sets that bring their own questions (targets and controls)
STREAMS.declare("vsr", "streams.vsr:VSR",
                summary="Visual Spatial Reasoning (cambridgeltl/vsr_zeroshot), true/false; released object sessions, "
                        "100/300/600 rows.")
STREAMS.declare("hm", "streams.hm:HatefulMemes", options="streams.options:HMOptions",
                summary="Hateful Memes, yes/no; the released session file, else a seeded stratified split; 100/300/600 rows.")
STREAMS.declare("mmvp", "streams.mmvp:MMVP", options="streams.options:MMVPOptions",
                summary="MMVP, 150 pairs of two-option questions; the released halves, 30 training rows a session.")
STREAMS.declare("visonlyqa", "streams.visonlyqa:VisOnlyQA",
                summary="VisOnlyQA (hub parquet files), lettered options; sessions by training category.")
# controls
STREAMS.declare("dalle", "streams.dalle:Dalle", summary="DALL-E 2 images of 22 TSI activities; control only.")
STREAMS.declare("cifar10", "streams.controls:CIFAR10", options=_CHECKSUM,
                summary="CIFAR-10 (torchvision root), 10 classes; control.")
STREAMS.declare("cifar100", "streams.controls:CIFAR100", options=_CHECKSUM,
                summary="CIFAR-100 (torchvision root), 100 classes; control.")
STREAMS.declare("dtd", "streams.controls:DTD", options=_DOWNLOAD,
                summary="Describable Textures (torchvision root), 47 classes, partition 1; control.")
STREAMS.declare("food101", "streams.controls:Food101", options=_DOWNLOAD,
                summary="Food-101 (torchvision root), 101 classes; control.")
STREAMS.declare("pets", "streams.controls:OxfordPets", options=_DOWNLOAD,
                summary="Oxford-IIIT Pet (torchvision root), 37 breeds; control.")
STREAMS.declare("flowers102", "streams.controls:Flowers102", options=_CHECKSUM,
                summary="Oxford Flowers-102 (torchvision root), 102 classes; control.")
STREAMS.declare("caltech101", "streams.controls:Caltech101", options=_SPLIT,
                summary="Caltech-101 (torchvision root), 101 classes, seeded split; control.")
STREAMS.declare("sun397", "streams.controls:SUN397", options=_SPLIT,
                summary="SUN397 scenes (torchvision root), 397 classes, seeded split; control.")
STREAMS.declare("mnist", "streams.controls:MNIST", options=_DOWNLOAD,
                summary="MNIST (torchvision root), 10 digits; control.")
STREAMS.declare("stanfordcars", "streams.controls:StanfordCars",
                summary="Stanford Cars (torchvision root), 196 car models; control.")
STREAMS.declare("imagefolder", "streams.controls:ImageFolder", options="streams.options:ImageFolderOptions",
                summary="Any folder of class folders with a class-names file (e.g. ImageNet val); control.")
# sequences of datasets (MTIL's protocol): one dataset per session
STREAMS.declare("sequence", "streams.sequence:Datasets", options="streams.options:SequenceOptions",
                summary="Any datasets as a sequence, one per session, each evaluated among its own classes "
                        "(MTIL's protocol).")
STREAMS.declare("mtil", "streams.mtil:MTIL", options="streams.options:MTILOptions",
                summary="MTIL's eleven datasets as a sequence, ZSCL's orders I and II, texts and splits "
                        "(Transfer/Avg/Last).")
STREAMS.declare("mini-mtil", "streams.sequence:MiniMTIL",
                summary="The mini world's five datasets as a sequence (shapes, colours, digits, handwritten, signs).")
# real data that ships with scikit-learn
STREAMS.declare("digits", "streams.digits:Digits", options="streams.options:DigitsOptions",
                summary="Real handwritten digits of scikit-learn (10 classes, seeded stratified split).")
