"""What every stream is made of: a :class:`StreamSpec` (data), labelled images and a loader.

A user adds a stream in one file: a data file with class names, templates and the session
class order, plus a :class:`Stream` subclass whose :meth:`Stream.dataset` reads the real
on-disk layout, registered with ``@STREAMS.register("name", options=...)``.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import yaml
from PIL import Image
from torch.utils.data import Dataset

from benchmark.errors import DataError
from benchmark.stream import SessionTest
from benchmark.vqa.questions import RULES, OwnQuestion
from streams.sampling import FewShotSampler, Session, held_out

log = logging.getLogger(__name__)
DATA_DIR = Path(__file__).parent / "data"
Split = Literal["train", "test"]


class StreamDataError(DataError):
    """A dataset root or file is missing or unreadable; the message names the path."""


@dataclass(frozen=True)
class StreamSpec:
    """A stream's data: class names, prompt templates and the session class order.

    ``class_order`` lists class indices in the order sessions receive them; sessions take
    consecutive groups ``numpy.array_split(class_order, n_sessions)``. ``class_keys`` are
    the dataset's own identifiers of the classes (folder names, ImageNet ids, ...), aligned
    with ``class_names``; without them a class's key is its index. In a data file the
    order may be written with keys instead of indices (``class_order_keys``).
    ``vqa_question`` is the question of the stream's multiple-choice VQA set (``fscl vqa
    build``; None: the stream has none). ``ppl_answer`` is the answer a VLM-loss strategy (``lorsu-ppl``,
    ``lora-ppl``) trains LLaVA to give to that question, ``{}`` standing for the class name. ``vqa_parse`` is the
    rule that reads a generated answer (``vqa.scoring: generate``): ``letter`` (an exact option letter), or a
    stream's released rule (``gtsrb``: the released code's lenient GTSRB parse), one of
    :data:`benchmark.vqa.questions.RULES`.

    A stream that brings its own questions (``own_questions: true``: VSR, Hateful Memes, MMVP, VisOnlyQA) has
    an :class:`~benchmark.vqa.questions.OwnQuestion` per image instead of class prompts: its "classes" are
    the groups its sessions are made of (VSR's objects, VisOnlyQA's categories, parts of HM and MMVP), fixed
    by ``sessions`` (the released groups, by class name: then exactly that many sessions can be asked), and
    ``vqa_positive`` names the answer whose probability ranks its items for an AUROC (HM: ``yes``).
    """

    name: str
    version: int
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    class_order: tuple[int, ...]
    class_keys: tuple[Hashable, ...] | None = None
    vqa_question: str | None = None
    ppl_answer: str = "{}"
    vqa_parse: str = "letter"
    own_questions: bool = False
    vqa_positive: str | None = None
    session_groups: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def from_file(cls, path: Path) -> StreamSpec:
        data = yaml.safe_load(Path(path).read_text())
        n = len(data["class_names"])
        keys = tuple(data["class_keys"]) if "class_keys" in data else None
        if keys is not None and (len(keys) != n or len(set(keys)) != n):
            raise ValueError(f"{path}: class_keys must be {n} distinct keys, one per class name")
        order = data.get("class_order", range(n))
        if "class_order_keys" in data:
            position = {k: i for i, k in enumerate(keys or ())}
            unknown = [k for k in data["class_order_keys"] if k not in position]
            if unknown:
                raise ValueError(f"{path}: class_order_keys names unknown keys {unknown[:5]}")
            order = [position[k] for k in data["class_order_keys"]]
        spec = cls(
            name=data["name"],
            version=int(data["version"]),
            class_names=tuple(data["class_names"]),
            templates=tuple(data["templates"]),
            class_order=tuple(order),
            class_keys=keys,
            vqa_question=data.get("vqa_question"),
            ppl_answer=data.get("ppl_answer", "{}"),
            vqa_parse=data.get("vqa_parse", "letter"),
            own_questions=bool(data.get("own_questions", False)),
            vqa_positive=data.get("vqa_positive"),
            session_groups=cls._groups(path, data),
        )
        if sorted(spec.class_order) != list(range(n)):
            raise ValueError(f"{path}: class_order must be a permutation of 0..{n - 1}")
        if not all("{}" in t for t in spec.templates):
            raise ValueError(f"{path}: every template needs a '{{}}' for the class name")
        if spec.vqa_parse not in RULES:
            raise ValueError(f"{path}: vqa_parse: invalid value {spec.vqa_parse!r}; allowed: {', '.join(RULES)}")
        if spec.ppl_answer.count("{}") != 1:
            raise ValueError(f"{path}: ppl_answer needs exactly one '{{}}' for the class name, got {spec.ppl_answer!r}")
        return spec

    @staticmethod
    def _groups(path: Path, data: dict[str, Any]) -> tuple[tuple[int, ...], ...] | None:
        """The ``sessions`` of a data file (lists of class names) as class indices; each class in one session."""
        if "sessions" not in data:
            return None
        names = list(data["class_names"])
        unknown = [n for group in data["sessions"] for n in group if n not in names]
        flat = [n for group in data["sessions"] for n in group]
        if unknown or sorted(flat) != sorted(names):
            raise ValueError(f"{path}: sessions must hold every class name exactly once (unknown: {unknown[:5]})")
        return tuple(tuple(names.index(n) for n in group) for group in data["sessions"])

    @property
    def keys(self) -> tuple[Hashable, ...]:
        """Every class's key, in label order (the indices themselves when there are no keys)."""
        return self.class_keys if self.class_keys is not None else tuple(range(len(self.class_names)))

    def key_index(self) -> dict[Hashable, int]:
        """Class key → label."""
        return {k: i for i, k in enumerate(self.keys)}

    def session_classes(self, n_sessions: int) -> list[list[int]]:
        """Class indices of each session (disjoint, in ``class_order``; the fixed ``session_groups`` when the
        data file has them)."""
        if self.session_groups is not None:
            if n_sessions != len(self.session_groups):
                raise ValueError(f"{self.name}: its sessions are the released {len(self.session_groups)} groups; "
                                 f"sessions: {n_sessions} cannot be made (use sessions: {len(self.session_groups)})")
            return [list(g) for g in self.session_groups]
        if n_sessions > len(self.class_order):
            raise ValueError(f"{self.name}: {n_sessions} sessions but only {len(self.class_order)} classes")
        return [g.tolist() for g in np.array_split(np.array(self.class_order), n_sessions)]

    def captions(self, label: int) -> list[str]:
        """Every prompt of class ``label`` (one per template)."""
        return [t.format(self.class_names[label]) for t in self.templates]


def open_image(path: Path) -> Image.Image:
    """Decode an image file to RGB, naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise StreamDataError(f"cannot read image {path}: {err}") from err


class LabelledImages(Dataset):
    """Images with integer labels and stable sample ids; yields ``(image, label)``, or
    ``(image, label, caption)`` when the dataset has its own per-image captions.

    ``items[i]`` is whatever ``load`` turns into a PIL image (a path, an array, ...);
    ``transform`` (PIL → tensor [3, H, W]) is applied on access. ``questions``: a stream's own question of
    each image (streams with ``own_questions``; their captions are the right options' CLIP texts and each
    image's label is its position in the listed split).
    """

    def __init__(
        self,
        items: Sequence[Any],
        targets: Sequence[int],
        ids: Sequence[str],
        load: Callable[[Any], Image.Image],
        transform: Callable | None = None,
        captions: Sequence[str] | None = None,
        questions: Sequence[OwnQuestion] | None = None,
    ) -> None:
        if not len(items) == len(targets) == len(ids):
            raise ValueError("items, targets and ids must have the same length")
        if captions is not None and len(captions) != len(items):
            raise ValueError("captions must have one entry per item")
        if questions is not None and len(questions) != len(items):
            raise ValueError("questions must have one entry per item")
        self.items = list(items)
        self.targets = [int(t) for t in targets]
        self.ids = list(ids)
        self.load = load
        self.transform = transform
        self.captions = list(captions) if captions is not None else None
        self.questions = list(questions) if questions is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image = self.load(self.items[i])
        image = self.transform(image) if self.transform else image
        if self.captions is not None:
            return image, self.targets[i], self.captions[i]
        return image, self.targets[i]

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in indices]

        return LabelledImages(pick(self.items), pick(self.targets), pick(self.ids), self.load, self.transform,
                              pick(self.captions), pick(self.questions))

    def with_classes(self, classes: Sequence[int]) -> LabelledImages:
        keep = set(classes)
        return self.subset([i for i, t in enumerate(self.targets) if t in keep])

    def with_transform(self, transform: Callable | None) -> LabelledImages:
        return LabelledImages(self.items, self.targets, self.ids, self.load, transform, self.captions, self.questions)

    def with_targets(self, targets: Sequence[int]) -> LabelledImages:
        """The same images with other labels (e.g. an own-question set's choice labels in zero-shot evaluation)."""
        return LabelledImages(self.items, targets, self.ids, self.load, self.transform, self.captions, self.questions)


class Stream(ABC):
    """A registered data stream: its spec plus a loader of its on-disk layout.

    Subclasses set :attr:`spec` and :attr:`folder` (its folder name under ``data_root``) and
    implement :meth:`dataset`; ``options`` is the stream's validated options dataclass.

    Unreadable images (``skip_bad_images``): a run decodes only what it uses. Training
    images are drawn from the whole listed split whatever the files hold (so the draws of
    good images never depend on bad files); with ``skip_bad_images`` the drawn ones are
    decoded when the sessions are made and a bad one is replaced by the next readable image
    of its class's seeded order (:class:`~streams.sampling.FewShotSampler`), warned about and
    recorded. Test images are all evaluated: with ``skip_bad_images`` the bad ones are left
    out (:meth:`readable`), warned about and recorded. Without it a bad image fails the run
    that meets it. ``fscl data check`` decodes every image.
    """

    spec: ClassVar[StreamSpec]
    folder: ClassVar[str | None] = None  # None: needs no files on disk
    # other names of the stream's folder under data_root (the released code's), looked for
    # when ``folder`` is absent; a name may hold several parts ("fgvc_aircraft/fgvc-aircraft-2013b")
    released_folders: ClassVar[tuple[str, ...]] = ()
    layout: ClassVar[str] = ""  # the expected tree, shown when the root is wrong
    splits: ClassVar[tuple[Split, ...]] = ("train", "test")  # ("test",): a control-only stream

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        self.root = self.locate(Path(data_root)) if self.folder else None
        self.options = options
        self.skip_bad_images = skip_bad_images
        self.skipped: dict[str, list[str]] = {}  # split -> ids of unreadable images met (left out or replaced)
        self._unreadable: dict[str, str | None] = {}  # train id -> decoding error (None: readable), once decoded
        self._readable: dict[Split, LabelledImages] = {}  # test splits without their unreadable images
        if self.root is not None and not self.root.is_dir():
            others = [str(Path(data_root) / name) for name in self.released_folders]
            also = f" (nor the released code's {' or '.join(others)})" if others else ""
            raise StreamDataError(
                f"{self.spec.name}: data folder not found: {self.root}{also}\nexpected layout:\n{self.layout}"
            )

    def folder_names(self) -> tuple[str, ...]:
        """Every accepted name of the stream's folder under ``data_root``: ours first, then the released code's."""
        return (self.folder, *self.released_folders) if self.folder else ()

    def locate(self, data_root: Path) -> Path:
        """The stream's folder under ``data_root``: ``folder`` when it is there, else the first released
        name that is (else ``folder``, for the error message)."""
        for name in self.folder_names():
            if (data_root / name).is_dir():
                return data_root / name
        return data_root / self.folder

    def data_record(self, sessions: Sequence[Session] | None = None) -> dict[str, Any]:
        """What a run record must keep about this stream's data: where its texts come from
        (data file version, dataset files read instead), unreadable images met, the split.

        ``skipped_images`` counts and lists the unreadable images met: test images left out,
        and training images met by the draw of ``sessions`` (with ``replaced``: per session,
        which id took the place of which). Without ``sessions``: the training images met by
        every draw made on this object (no ``replaced``).
        """
        record: dict[str, Any] = {"texts": {"version": self.spec.version, **self.text_sources()}}
        met = {i for split, ids in self.skipped.items() if split != "train" for i in ids}
        if sessions is None:
            met |= set(self.skipped.get("train", []))
        else:
            met |= {i for s in sessions for i in s.unreadable}
        if met:
            record["skipped_images"] = {"count": len(met), "ids": sorted(met)}
            replaced = {f"session_{s.index}": dict(s.replaced) for s in sessions or () if s.replaced}
            if replaced:
                record["skipped_images"]["replaced"] = replaced
        return record

    def text_sources(self) -> dict[str, str]:
        """Dataset files that replace texts of the stream's data file, by what they hold
        (``class_names``, ``captions``: training captions); empty when none does."""
        return {}

    @abstractmethod
    def dataset(self, split: Split) -> LabelledImages:
        """The whole ``split`` (images untransformed)."""

    def listed(self, split: Split) -> LabelledImages:
        """The whole ``split`` as listed on disk (nothing decoded, nothing left out)."""
        return self.dataset(split)

    def usable(self, split: Split) -> LabelledImages:
        """The ``split``: as listed, except that with ``skip_bad_images`` the unreadable test
        images are left out (decoded once, here). Training images are never decoded here: the
        drawn ones are, by :meth:`sessions`."""
        data = self.listed(split)
        if not self.skip_bad_images or split == "train":
            return data
        if split not in self._readable:
            self._readable[split] = self.readable(split, data)
        return self._readable[split]

    def readable(self, split: Split, data: LabelledImages) -> LabelledImages:
        """``data`` without the images that cannot be decoded (decodes each one); the bad ones
        are warned about and recorded under ``split`` (:meth:`data_record`)."""
        bad = unreadable(data)
        if bad:
            log.warning("%s: leaving out %d unreadable image(s) of the %s split (skip_bad_images), e.g. %s",
                        self.spec.name, len(bad), split, bad[0][1])
            self.skipped[split] = sorted({*self.skipped.get(split, []), *(data.ids[i] for i, _ in bad)})
        drop = {i for i, _ in bad}
        return data.subset([i for i in range(len(data)) if i not in drop]) if drop else data

    def sessions(self, n_sessions: int, shots: int, shot_seed: int) -> list[Session]:
        """The few-shot training sessions (sample ids drawn by :class:`FewShotSampler`).

        With ``skip_bad_images`` the drawn images are decoded and an unreadable one replaced
        (see the class docstring); without it nothing is decoded here.
        """
        train = self.listed("train")
        sampler = FewShotSampler(self.spec.name, shots, shot_seed)
        check = self._train_check(train) if self.skip_bad_images else None
        out = [sampler.sample(train.targets, train.ids, i + 1, classes, check)
               for i, classes in enumerate(self.spec.session_classes(n_sessions))]
        for session in out:
            self._report_replacements(session, train)
        return out

    def _train_check(self, train: LabelledImages) -> Callable[[int], str | None]:
        """Index of ``train`` -> its decoding error (None when it decodes); each image decoded once."""
        def check(i: int) -> str | None:
            sid = train.ids[i]
            if sid not in self._unreadable:
                try:
                    train.load(train.items[i])
                    self._unreadable[sid] = None
                except StreamDataError as err:
                    self._unreadable[sid] = str(err)
            return self._unreadable[sid]
        return check

    def _report_replacements(self, session: Session, train: LabelledImages) -> None:
        """Warn about and record the unreadable images a draw met; fail a class left with none."""
        if not session.unreadable:
            return
        self.skipped["train"] = sorted({*self.skipped.get("train", []), *session.unreadable})
        for bad, good in session.replaced.items():
            log.warning("%s: session %d: drawn training image %s is unreadable (%s); %s (skip_bad_images)",
                        self.spec.name, session.index, bad, self._unreadable.get(bad),
                        f"replaced by {good}" if good else "no readable image of its class is left to replace it")
        drawn = set(session.ids)
        kept = {t for t, sid in zip(train.targets, train.ids) if sid in drawn}
        empty = [c for c in session.classes if c not in kept]
        if empty:
            raise StreamDataError(f"{self.spec.name}: no readable training image of class(es) "
                                  f"{', '.join(repr(self.spec.class_names[c]) for c in empty)} "
                                  f"(unreadable: {', '.join(session.unreadable[:5])})")

    def validation(self, per_class: int, seed: int = 0) -> Stream:
        """This stream's validation view (:class:`Validation`): ``per_class`` images per class held out of
        its training split are its test split, the rest its training split; its own test split is never read."""
        return Validation(self, per_class, seed)

    def benchmark(self, sessions: list[Session], train_transform: Callable, eval_transform: Callable):
        """An Avalanche benchmark: train stream = sessions, test stream = each session's test images (:meth:`session_test`)."""
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.utils import as_classification_dataset

        train, test = self.listed("train"), self.dataset("test")
        index = {sid: i for i, sid in enumerate(train.ids)}
        return benchmark_from_datasets(
            train=[as_classification_dataset(train.subset([index[s] for s in sess.ids]).with_transform(train_transform))
                   for sess in sessions],
            test=[as_classification_dataset(self.session_test(test, sess).with_transform(eval_transform))
                  for sess in sessions],
        )

    def session_eval(self, session: Session) -> SessionTest:
        """``session``'s zero-shot evaluation on the stream's test split (:meth:`session_eval_of`)."""
        return self.session_eval_of(self.dataset("test"), session)

    def session_eval_of(self, test: LabelledImages, session: Session) -> SessionTest:
        """``session``'s zero-shot evaluation on ``test``: the images of its classes, among all the stream's
        classes, in its templates."""
        spec = self.spec
        return SessionTest(spec.name, spec.class_names, spec.templates, self.session_test(test, session))

    def session_datasets(self, sessions: Sequence[Session]) -> list[str] | None:
        """None: the sessions are class groups of this one dataset (a sequence names its datasets)."""
        return None

    def session_test(self, test: LabelledImages, session: Session) -> LabelledImages:
        """The test images of ``session``'s experience: those of its classes (a stream whose test split is asked
        whole after every session returns ``test``)."""
        return test.with_classes(session.classes)


class Validation(Stream):
    """A stream seen through its training split only (``fscl tune``'s protocol): a seeded draw of
    ``per_class`` images per class of the source's training split (at most half of each class,
    :func:`~streams.sampling.held_out`) is the ``test`` split, the other training images the ``train``
    split, so few-shot sessions drawn from it are disjoint from the validation images. The source's
    test split is never read. A control-only stream (no training split) has no validation view."""

    def __init__(self, source: Stream, per_class: int, seed: int = 0) -> None:
        if "train" not in source.splits:
            raise StreamDataError(f"{source.spec.name}: has no training split to hold validation images out of "
                                  f"(a control-only stream); leave it out of the controls of a validation run")
        self.source, self.per_class, self.seed = source, per_class, seed
        self.spec = source.spec  # type: ignore[misc]  (an instance's spec: the source's)
        self.root, self.options, self.skip_bad_images = source.root, source.options, source.skip_bad_images
        self.skipped, self._unreadable = source.skipped, source._unreadable
        listed = source.listed("train")
        held = held_out(listed.targets, per_class, seed, source.spec.name)
        keep = sorted(set(range(len(listed))) - set(held))
        self._splits = {"train": listed.subset(keep), "test": listed.subset(held)}

    def dataset(self, split: Split) -> LabelledImages:
        return self._splits[split]

    def data_record(self, sessions: Sequence[Session] | None = None) -> dict[str, Any]:
        """The source's record, plus the validation split: its images held out of the training split."""
        record = self.source.data_record(sessions)
        held = self._splits["test"]
        record["validation"] = {"per_class": self.per_class, "seed": self.seed, "size": len(held),
                                "of_train": len(held) + len(self._splits["train"]), "ids": held.ids}
        return record

    def text_sources(self) -> dict[str, str]:
        return self.source.text_sources()

    def session_eval_of(self, test: LabelledImages, session: Session) -> SessionTest:
        return self.source.session_eval_of(test, session)

    def session_datasets(self, sessions: Sequence[Session]) -> list[str] | None:
        return self.source.session_datasets(sessions)


def unreadable(data: LabelledImages, limit: int | None = None, progress: str = "") -> list[tuple[int, str]]:
    """(index, error message) of the images of ``data`` that cannot be decoded.

    Stops after ``limit`` bad images when given; ``progress`` (a label) draws a bar on
    stderr. Decodes every image: slow on big sets.
    """
    from tqdm.auto import tqdm

    bad: list[tuple[int, str]] = []
    items = tqdm(data.items, desc=progress, unit="img", leave=False, disable=not progress)
    for i, item in enumerate(items):
        try:
            data.load(item)
        except StreamDataError as err:
            bad.append((i, str(err)))
            if limit is not None and len(bad) >= limit:
                break
    return bad
