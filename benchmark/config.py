"""Run configuration: dataclasses loaded from YAML, ``key=value`` overrides, grid expansion.

A config file (or a preset shipped in ``benchmark/presets``) holds the top-level keys of
:class:`Config`; a section named after a registered strategy or stream holds that
strategy's or stream's options (``lorsu: {top_k_heads: 4}`` or ``lorsu.top_k_heads=4``), and a
strategy's section may hold its own training keys (``lorsu: {train: {lr: 5.0e-4}}``), which win
over ``train`` in that strategy's runs.

Grids: list values of the grid axes (stream, strategy, backbone, shots, seed) expand into one
run per combination, and so does a list value of any other key whose declared type takes no
list (``train.lr: [1.0e-5, 1.0e-4]``, ``lorsu.top_k_heads: [1, 2, 4]``); a key whose type is a list
(``controls``, ``loggers``) never expands. A key of a strategy's or stream's section is swept only
in the runs of that strategy (of that stream, as target or control). Every value is checked
before any work starts, every problem at once; each names the key, the bad value and what is allowed.
A run's resolved config (:meth:`Config.resolve`) holds every option of its strategy and streams, and
records are compared in that form (:func:`compared`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import re
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

import yaml

from benchmark.errors import FsclError
from benchmark.registry import STRATEGIES, STREAMS, VLMS
from benchmark.vlm.spec import allowed_vlms

PRESET_DIR = Path(__file__).parent / "presets"
DEMO_PRESET = "mini"  # the offline benchmark of `fscl demo` (and `fscl run mini`)
GRID_AXES = ("stream", "strategy", "backbone", "shots", "seed")
ALL_SHOTS = "all"  # shots: every training image of a session's classes (full-shot MTIL)
TRAIN = "train"  # the training recipe's section, at top level and in a strategy's section
EVALUATIONS = ("zeroshot", "vqa")  # what a run may evaluate (Config.evaluate), in this order
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


SEED_MAX = 2**32 - 1  # numpy's global seed takes [0, 2^32 - 1]
_COLLECTED: ContextVar[list[str] | None] = ContextVar("fscl_config_problems", default=None)


class ConfigError(FsclError, ValueError):
    """Configuration values are invalid; each problem names the key and what is allowed (one: the message;
    several: counted, then one a line)."""

    def __init__(self, *problems: str) -> None:
        self.problems = list(problems)
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{len(problems)} invalid values:\n" + "\n".join(f"- {p}" for p in problems))


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``ok`` (inside :func:`collecting`: note it and go on)."""
    if not ok:
        problem = f"{key}: invalid value {value!r}; allowed: {allowed}"
        found = _COLLECTED.get()
        if found is None:
            raise ConfigError(problem)
        found.append(problem)


@contextmanager
def collecting(problems: list[str], every_check: bool = False) -> Iterator[None]:
    """A block whose :class:`ConfigError` is added to ``problems`` instead of raised; with ``every_check``, each
    failed :func:`check` in it is added and the block goes on (only for blocks of plain checks, such as a
    dataclass's ``__post_init__``: code that relies on a check raising, as :func:`coerce` does, never runs so)."""
    token = _COLLECTED.set(problems if every_check else None)
    try:
        yield
    except ConfigError as err:
        problems.extend(err.problems)
    finally:
        _COLLECTED.reset(token)


def raise_problems(problems: list[str]) -> None:
    """Raise one :class:`ConfigError` holding every one of ``problems`` (each once), if any."""
    if problems:
        raise ConfigError(*dict.fromkeys(problems))


@dataclass
class TrainConfig:
    """The training recipe, one for every strategy in a run (strategies never change it).

    Defaults: the paper's recipe as the released LoRSU code runs it (docs/fidelity.md).
    """

    epochs: int = field(default=5, metadata={"help": "passes over each session's training data"})
    steps: int | None = field(default=None, metadata={
        "help": "optimizer steps per session instead of epochs (the loader starts over as often as needed; the "
                "last pass is cut at the step count), e.g. ZSCL's 1000 iterations per dataset; null: epochs"})
    batch_size: int = field(default=16, metadata={"help": "training images per optimizer step"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (Adam, no weight decay)"})
    min_lr: float = field(default=1e-6, metadata={"help": "warm-up start and cosine floor"})
    warmup_steps: int = field(default=1, metadata={"help": "linear warm-up steps from min_lr to lr"})
    scheduler_step: Literal["step", "epoch"] = field(default="step", metadata={
        "help": "advance the schedule every step, or once per epoch (the released code: epoch 0 runs at min_lr)"})
    drop_last: bool | Literal["auto"] = field(default="auto", metadata={
        "help": "drop the last partial batch: auto = only when the session holds more than one batch "
                "(the released loader's rule), true = always, false = never"})
    augment: Literal["released", "openclip"] = field(default="released", metadata={
        "help": "training augmentation: open_clip's random resized crop (openclip), plus the released code's "
                "colour jitter (0.32, 0.32, 0.32, 0.08; p 0.8) and grayscale (p 0.2) (released)"})
    eval_batch_size: int = field(default=64, metadata={"help": "images per evaluation batch"})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={
        "help": "autocast dtype of training and evaluation: auto = bf16 on GPU, fp32 on CPU; fp16 trains with a "
                "gradient scaler"})
    num_workers: int | Literal["auto"] = field(default="auto", metadata={
        "help": "data-loader worker processes of training and evaluation: auto = one per usable core but one, at "
                "most 8 (a --jobs process counts its share of the cores); 0 = load in the main process. The "
                "numbers are the same for any value"})

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        check(self.steps is None or (isinstance(self.steps, int) and self.steps >= 1), "train.steps", self.steps,
              "an integer >= 1, or null (epochs decide)")
        check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        check(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size, "an integer >= 1")
        check(self.lr > 0, "train.lr", self.lr, "a float > 0")
        check(0 <= self.min_lr and (self.lr <= 0 or self.min_lr <= self.lr), "train.min_lr", self.min_lr,
              f"a float in [0, lr={self.lr}]")  # against an lr that is itself refused, only >= 0
        check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "an integer >= 0")
        check(self.num_workers == "auto" or self.num_workers >= 0, "train.num_workers", self.num_workers,
              "an integer >= 0, or auto")


@dataclass
class VQAConfig:
    """Multiple-choice VQA through a VLM whose vision tower takes the run's encoder (off by default)."""

    model: str | None = field(default=None, metadata={
        "help": "the VLM: FAMILY:SOURCE of a registered VLM family (`fscl ls vlms`), e.g. a folder or hub id of "
                "the paper's LLaVA-1.5, or mini (the mini world's small VLM; built on first use); "
                "null = no VQA evaluation"})
    scoring: Literal["letter", "generate"] = field(default="letter", metadata={
        "help": "letter: the most probable option letter at the first answer token (one forward pass per batch); "
                "generate: the released greedy answer (20 new tokens) and parse rules, for parity with the paper"})
    sets: list[str] | None = field(default=None, metadata={
        "help": "the datasets asked: the run's target (always asked) and those of its controls named here; "
                "null = the target and every control"})
    mode: Literal["random", "hard"] = field(default="random", metadata={
        "help": "distractors: random classes, or the classes closest to the answer under the run's backbone "
                "before training (hard)"})
    seed: int = field(default=0, metadata={"help": "seed of the questions (distractors, letter order) and subsets"})
    batch_size: int = field(default=16, metadata={"help": "questions per forward pass"})
    sessions: Literal["ends", "all"] = field(default="ends", metadata={
        "help": "evaluate before training and after the last session (ends, as the paper), or after every session"})
    subset: int | None = field(default=None, metadata={
        "help": "with sessions: all, a seeded subset of N questions per dataset after every session, the ends "
                "included (the full sets also at the ends); null = full sets"})

    def __post_init__(self) -> None:
        family = self.model.partition(":")[0] if isinstance(self.model, str) else ""
        check(self.model is None or family in VLMS, "vqa.model", self.model, f"{allowed_vlms(family)}; or null for no VQA")
        check(0 <= self.seed <= SEED_MAX, "vqa.seed", self.seed, f"an integer in [0, {SEED_MAX}]")
        check(self.batch_size >= 1, "vqa.batch_size", self.batch_size, "an integer >= 1")
        check(self.subset is None or self.subset >= 1, "vqa.subset", self.subset, "an integer >= 1, or null")
        check(self.subset is None or self.sessions == "all", "vqa.subset", self.subset,
              "null with vqa.sessions: ends (the ends ask the full sets; set vqa.sessions: all to ask a subset after "
              "every session)")


@dataclass
class Config:
    """Everything one benchmark invocation needs; axes may hold lists until :meth:`expand`."""

    name: str = "default"
    stream: Any = "digits"
    strategy: Any = "zeroshot"
    backbone: Any = "openclip:fscl-tiny"
    shots: Any = 5
    seed: Any = 0
    sessions: int = 5
    # the order of the sessions: the stream's (released), or a permutation drawn from the shot seed (seed); the same
    # shots either way, so that order sensitivity is measured alone (a list of both sweeps it)
    session_order: Literal["released", "seed"] = "released"
    shot_seed: int | None = None  # seed of the few-shot draws and control subsets; null: the run's seed
    controls: list[str] = field(default_factory=list)  # a run never uses its own stream as a control
    control_subset: int | None = None  # evaluate a fixed, seeded subset of N images per control
    skip_bad_images: bool = False  # leave unreadable images out (counted in the record) instead of failing
    data_root: str = "data"
    out: str = "runs"
    device: str = "auto"
    loggers: list[Literal["text", "csv", "tensorboard", "wandb", "interactive"]] = field(
        default_factory=lambda: ["text"]
    )
    keep_checkpoints: Literal["last", "all", "none"] = "none"  # per-session checkpoints kept after success
    ddp: bool = False  # data-parallel runs over the launched processes instead of sharding the grid
    # evaluated images decoded, resized and cropped once into uint8 files under the cache folder (disk), also held
    # on the GPU when they fit (device), or decoded at every evaluation (off); the numbers are the same
    eval_cache: Literal["disk", "device", "off"] = "disk"
    # what a run evaluates after its sessions: zero-shot classification (needs a backbone with a text tower) and the
    # VLM's VQA (with vqa.model); reports, TI/CC and tune use whichever a run has
    evaluate: list[Literal["zeroshot", "vqa"]] = field(default_factory=lambda: list(EVALUATIONS))
    train: TrainConfig = field(default_factory=TrainConfig)
    vqa: VQAConfig = field(default_factory=VQAConfig)
    # null: evaluate on the test splits; N: hold N images per class out of the target's training pool and draw
    # N per class from each control's training split, and evaluate on those, never on a test split (fscl tune)
    validation_per_class: int | None = None
    swept: dict[str, Any] = field(default_factory=dict)  # a run's values of its grid's swept keys (its folder name)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per strategy/stream name
    sweeps: dict[str, list] = field(default_factory=dict, repr=False)  # a grid's swept keys -> their values

    def expand(self) -> list[Config]:
        """One :class:`Config` per grid point, in a stable order: axes and swept keys as scalars (the swept
        ones of each run in its ``swept``), a strategy's own ``train`` keys resolved into ``train``."""
        runs, seen = [], {}
        for combo in itertools.product(*(_as_list(getattr(self, a)) for a in GRID_AXES)):
            base = dataclasses.replace(self, **dict(zip(GRID_AXES, combo)), sweeps={})
            keys = [k for k in self.sweeps if _sweeps_in(k, base)]
            # a section's key swept for other runs is left out of this run's record (its default), not its 1st value
            base.options = without_keys(base.options, [k for k in self.sweeps if k not in keys and k.partition(".")[0]
                                                   in base.options])
            for values in itertools.product(*(self.sweeps[k] for k in keys)):
                run = _with_values(base, dict(zip(keys, values))) if keys else dataclasses.replace(base)
                run.swept = {**self.swept, **dict(zip(keys, values))}  # a run's own config.yaml keeps its folder
                run.resolve()
                where = (run.stream, run.backbone, run.strategy, run.shots, run.seed, sweep_tag(run.swept))
                check(where not in seen, "grid", run.swept, f"swept values that name distinct run folders "
                                                           f"({seen.get(where)} and {run.swept} do not)")
                seen[where] = run.swept
                runs.append(run)
        return runs

    def resolve(self) -> None:
        """Make a grid point's config what its run records: its own stream left out of the controls, the
        shot seed set, its strategy's ``train`` keys moved into ``train``, and of the option sections only those
        that reach the run (its strategy's, its target's and its controls'), each with every option resolved, and
        those options parsed into their dataclasses, once (:meth:`options_of`)."""
        self.controls = [c for c in self.controls if c != self.stream]  # one control list serves a grid of targets
        if self.shot_seed is None:  # as the released code: each seed draws its own shots
            self.shot_seed = self.seed
        own = self.options.get(self.strategy, {}).get(TRAIN) if self.strategy in STRATEGIES else None
        if own:
            self.train = from_dict(TrainConfig, {**dataclasses.asdict(self.train), **own}, prefix=f"{self.strategy}.train")
        # not a field: config.yaml keeps the plain sections of ``options``, the run stages read these
        self._parsed = {name: self.options_for(name, entry.options)
                        for name in dict.fromkeys([self.strategy, self.stream, *self.controls])
                        if (entry := section_entry(name)) is not None}
        self.options = {name: dataclasses.asdict(options) for name, options in self._parsed.items() if options is not None}

    def options_of(self, name: str) -> Any:
        """The options dataclass of a grid point's strategy, target or control ``name`` (None for one that takes
        none), parsed once when the grid expanded (:meth:`expand`, :meth:`resolve`)."""
        return self._parsed[name]

    def options_for(self, name: str, options_type: type | None) -> Any:
        """The validated options dataclass of strategy/stream ``name`` (None if it takes none)."""
        if options_type is None:
            return None
        section = self.options.get(name, {})
        if name in STRATEGIES:
            section = {k: v for k, v in section.items() if k != TRAIN}
        return from_dict(options_type, section, prefix=name)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, options sections back at top level (as written in YAML), swept lists in place."""
        data = dataclasses.asdict(self)
        sweeps = data.pop("sweeps")
        data.update(data.pop("options"))
        for key, values in sweeps.items():
            set_dotted(data, key, list(values))
        return data


def sweep_tag(swept: dict[str, Any], limit: int = 60) -> str:
    """The folder name of a run's swept values (empty when none): ``key=value`` joined by ``,``, keys by
    their last part unless two share it (then the dotted keys), values as in YAML
    (floats by their shortest exact form, ``0.0005``); cut to ``limit`` characters plus a hash of the
    whole when longer, or when a value holds a character a folder name should not."""
    if not swept:
        return ""
    short = {k: k.rsplit(".", 1)[-1] for k in swept}
    if len(set(short.values())) < len(short):
        short = {k: k for k in swept}
    text = ",".join(f"{short[k]}={_tag_value(swept[k])}" for k in sorted(swept))
    clean = re.sub(r"[^A-Za-z0-9._=,+-]", "-", text)
    if clean != text or len(clean) > limit:
        clean = f"{clean[: limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return clean


def _tag_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def _sweeps_in(key: str, run: Config) -> bool:
    """Whether swept ``key`` varies in ``run`` (scalar axes): a section's key only in its strategy's runs (its
    stream's: as target or control); ``train.X`` not where the run's strategy sets its own ``X``."""
    head, _, rest = key.partition(".")
    if head in STRATEGIES:
        return head == run.strategy
    if head in STREAMS:
        return head == run.stream or head in run.controls
    if head == TRAIN:
        own = (run.options.get(run.strategy, {}).get(TRAIN) or {}) if run.strategy in STRATEGIES else {}
        return rest not in own
    return True


def without_keys(data: dict[str, Any], keys: typing.Iterable[str]) -> dict[str, Any]:
    """A deep copy of nested ``data`` without the dotted ``keys`` (``lorsu.top_k_heads``, ``lorsu.train.lr``)."""
    data = copy.deepcopy(data)
    for key in keys:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def _with_values(run: Config, values: dict[str, Any]) -> Config:
    """``run`` with dotted keys set to ``values`` (validated again: a value may fail with another's company)."""
    data = run.to_dict()
    for key, value in values.items():
        set_dotted(data, key, value)
    return parse_config(data)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (``lorsu.train.lr``) of a nested mapping in place, making sections as needed."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: '{part}' is not a section")
    node[leaf] = value


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``train.lr``) → values; an empty section stays one key."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def compared(config: dict[str, Any]) -> dict[str, Any]:
    """A run's resolved config (its ``config.yaml``, a checkpoint's) as dotted keys → values, the form in which
    two are compared: keys it lacks (written before they existed, or before records held every option) at their
    defaults, and of the option sections only those that reach the run (its strategy's, target's, controls')."""
    reach = [config.get("strategy"), config.get("stream"), *(config.get("controls") or [])]
    flat = flatten(Config().to_dict())
    for name in reach:
        entry = section_entry(name)
        if entry is not None and entry.options is not None:
            flat.update({f"{name}.{f.name}": field_default(f) for f in dataclasses.fields(entry.options)})
    flat.update(flatten({k: v for k, v in config.items()
                         if section_entry(k) is None or (k in reach and v != {})}))
    return flat


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# --------------------------------------------------------------------------- coercion
def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` (ints accepted as floats); return it."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, bool) and ("on" if value else "off") in allowed:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off / on as false / true
        check(value in allowed, key, value, " | ".join(map(str, allowed)))
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err).split("allowed: ")[-1])
        check(False, key, value, " or ".join(errors + (["null"] if type(None) in typing.get_args(hint) else [])))
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), key, value, f"a list of {describe_type(typing.get_args(hint)[0])}")
        (item,) = typing.get_args(hint)[:1]
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), key, value, "a mapping")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        check(isinstance(value, dict), key, value, f"a mapping of {hint.__name__} keys")
        return from_dict(hint, value, prefix=key)
    if hint is bool:
        check(isinstance(value, bool), key, value, "true or false")
    elif hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
    elif hint is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
        check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key, value,
              "a finite number")
        return float(value)
    elif hint is str:
        check(isinstance(value, str), key, value, "a string")
    return value


def describe_type(hint: Any) -> str:
    """A type as the CLI names it: ``int``, ``str | null``, ``importance | random`` (a Literal's values)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin in (list, tuple):
        return f"list[{describe_type(args[0])}]"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


class OptionDoc(NamedTuple):
    """One field of an options dataclass, as ``fscl ls -v`` prints it."""

    name: str
    type: str  # see describe_type
    default: Any  # dataclasses.MISSING when the field is required
    help: str


def describe_options(cls: type) -> list[OptionDoc]:
    """Name, type, default and help text (``field(metadata={"help": ...})``) of every field of ``cls``."""
    hints = typing.get_type_hints(cls)
    docs = []
    for f in dataclasses.fields(cls):
        docs.append(OptionDoc(f.name, describe_type(hints[f.name]), field_default(f), f.metadata.get("help", "")))
    return docs


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with a suggestion; every problem of ``data``
    at once (:class:`ConfigError`)."""
    built, problems = build(cls, data, prefix)
    raise_problems(problems)
    return built


def build(cls: type, data: dict[str, Any], prefix: str = "", also: typing.Sequence[str] = ()) -> tuple[Any, list[str]]:
    """Dataclass ``cls`` from the values of ``data`` that pass their checks (None when it cannot be built from
    them), and the problems of the others and of its own checks; an unknown key's suggestion is among its
    fields and the names ``also`` allowed beside them."""
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, [*names, *also], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"{full}: unknown key.{hint} Allowed keys: {', '.join(names)}"
                            + (", or the name of a strategy or stream (its options)" if also else ""))
            continue
        with collecting(problems):
            kwargs[key] = coerce(value, hints[key], full)
    try:
        with collecting(problems, every_check=True):
            return cls(**kwargs), problems
    except (TypeError, ValueError) as err:
        problems.append(f"{prefix or cls.__name__}: {err}")
    return None, problems


def stream_options(name: str, pairs: typing.Sequence[str]) -> Any:
    """The validated options of stream ``name`` from ``key=value`` strings (values parsed as YAML), as a
    verb's ``-o key=value`` gives them; None for a stream that takes no options and got none."""
    entry = STREAMS.get(name)
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"--option '{pair}' must look like key=value")
        values[key] = yaml.safe_load(raw) if raw.strip() else ""
    if values and entry.options is None:
        raise ConfigError(f"stream '{name}' takes no options")
    return from_dict(entry.options, values, prefix=name) if entry.options else None


# --------------------------------------------------------------------------- loading
def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_source(source: str | None) -> dict[str, Any]:
    """YAML mapping of a preset name or a config file path; None: no preset, the documented defaults
    (the dataclasses' values; the name then comes from the stream, see :func:`load_config`)."""
    if source is None:
        return {}
    path = Path(source)
    if not (source.endswith((".yaml", ".yml")) or path.is_file()):
        if source not in list_presets():
            close = difflib.get_close_matches(source, list_presets(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"'{source}' is neither a config file nor a preset.{hint} Presets: {', '.join(list_presets())}"
            )
        path = PRESET_DIR / f"{source}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b=value`` (value parsed as YAML; ``x,y`` on a grid axis is a list) in place."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{override}' must look like key=value (e.g. seed=0,1,2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
        if key in GRID_AXES + ("controls",) and isinstance(value, str) and "," in value:
            value = [yaml.safe_load(v) for v in value.split(",")]
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': the value is not valid YAML ({err.problem or err})") from None
    try:
        set_dotted(data, key, value)
    except ConfigError as err:
        raise ConfigError(f"override '{override}': {str(err).partition(': ')[2]}") from None


def load_config(source: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load, override and fully validate a configuration: a preset or config file (``source``), or
    without one the documented defaults, named after the stream(s) unless ``name=`` is given."""
    data = read_source(source)
    for override in overrides:
        apply_override(data, override)
    if "name" not in data:
        data["name"] = "+".join(map(str, _as_list(data.get("stream", Config.stream))))
    return parse_config(data)


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a plain mapping into a :class:`Config` (names, ranges, option sections); the list values of
    keys whose type takes no list become its ``sweeps``, each value checked with the others' first. Every
    problem at once: one :class:`ConfigError` holding them all."""
    problems: list[str] = []
    data, sweeps = split_sweeps(data, problems)
    cfg = _parse(data, problems)
    for key, values in sweeps.items():
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        with collecting(problems):
            check(not repeated, key, values, f"each value once (repeated: {', '.join(repeated)})")
        for value in values[1:]:
            other = copy.deepcopy(data)
            set_dotted(other, key, value)
            _parse(other, problems)
    raise_problems(problems)
    cfg.sweeps = sweeps
    return cfg


def _parse(data: dict[str, Any], problems: list[str]) -> Config:
    """:class:`Config` from the values of ``data`` that pass their checks; the problems of the others added to
    ``problems``."""
    data = dict(data)
    top = {f.name for f in dataclasses.fields(Config)} - {"options", "sweeps"}
    with collecting(problems):
        check("sweeps" not in data, "sweeps", data.pop("sweeps", None), "nothing: a key's list of values is its sweep")
    options = {k: data.pop(k) for k in list(data) if k not in top and (k in STRATEGIES or k in STREAMS)}
    cfg, found = build(Config, data, also=[*STRATEGIES.names(), *STREAMS.names()])
    problems += found
    cfg.options = options
    _validate(cfg, problems)
    return cfg


def _declaring(key: str) -> tuple[type | None, str]:
    """The dataclass that declares dotted config ``key`` and the field's name there (None: not a known key)."""
    head, _, rest = key.partition(".")
    if not rest:
        return (None if head in ("options", "sweeps") else Config), head
    section: Any = {TRAIN: TrainConfig, "vqa": VQAConfig}.get(head)
    if section is None and head in STRATEGIES and rest.startswith(f"{TRAIN}."):
        section, rest = TrainConfig, rest[len(TRAIN) + 1:]
    elif section is None:
        entry = section_entry(head)
        section = entry.options if entry is not None else None
    return (None if "." in rest else section), rest


def declared_type(key: str) -> Any:
    """The declared type of dotted config ``key`` (``train.lr`` → float, ``lorsu.train.lr`` → float,
    ``lorsu.top_k_heads`` → int, ``controls`` → list[str]); None for a key that is not known."""
    cls, name = _declaring(key)
    return None if cls is None else _type_hints(cls).get(name)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # slow (evaluates every annotation): once per class


def declared_default(key: str) -> Any:
    """The documented default of dotted config ``key`` (``lorsu.top_k_heads`` → 2); MISSING when it has none."""
    cls, name = _declaring(key)
    for f in dataclasses.fields(cls) if cls is not None else ():
        if f.name == name:
            return field_default(f)
    return dataclasses.MISSING


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (its factory's value); MISSING when it has none."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def section_entry(name: Any) -> Any:
    """The registry entry of the strategy or stream whose option section is named ``name`` (None: no such)."""
    if not isinstance(name, str):
        return None
    return STRATEGIES.get(name) if name in STRATEGIES else STREAMS.get(name) if name in STREAMS else None


def takes_list(hint: Any) -> bool:
    """Whether a value of type ``hint`` may itself be a list or mapping (then a list value never expands)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(takes_list(h) for h in typing.get_args(hint))
    return origin in (list, tuple, dict) or hint in (list, tuple, dict)


def split_sweeps(data: dict[str, Any], problems: list[str]) -> tuple[dict[str, Any], dict[str, list]]:
    """A copy of ``data`` whose list values at keys that take no list (see :func:`takes_list`; the grid axes
    stay lists) are replaced by their first value, and those lists (values checked) by dotted key; a list
    with a bad value is left out, its problems added to ``problems``."""
    sweeps: dict[str, list] = {}

    def walk(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            full = f"{prefix}{key}"
            hint = declared_type(full)
            if isinstance(value, dict) and (hint is None or dataclasses.is_dataclass(hint)):
                out[key] = walk(value, f"{full}.")
            elif isinstance(value, (list, tuple)) and hint is not None and not takes_list(hint):
                found: list[str] = []
                with collecting(found):
                    check(len(value) > 0, full, value, "a value, or a non-empty list of values (a sweep)")
                    values = [coerce(v, hint, f"{full}[{i}]") for i, v in enumerate(value)]
                if found:
                    problems.extend(found)
                    continue
                sweeps[full] = values
                out[key] = values[0]
            else:
                out[key] = value
        return out

    return walk(dict(data), ""), sweeps


def _validate(cfg: Config, problems: list[str]) -> None:
    """Add every problem of ``cfg``'s values to ``problems``: names, ranges, the grid's axes (none empty), and the
    option sections of its strategies and streams (those not given at their defaults)."""
    with collecting(problems, every_check=True):
        for axis in GRID_AXES:
            values = _as_list(getattr(cfg, axis))
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            check(bool(values), axis, getattr(cfg, axis), "a value, or a non-empty list of values (a grid axis)")
            check(not repeated, axis, getattr(cfg, axis), f"each value once (repeated: {', '.join(repeated)})")
        for axis, registry in (("stream", STREAMS), ("strategy", STRATEGIES)):
            for name in _as_list(getattr(cfg, axis)):
                if not isinstance(name, str):
                    check(False, axis, name, "a name or list of names")
                elif name not in registry:
                    problems.append(f"{axis}: {registry.unknown_message(name)}")
        problems += [f"controls: {STREAMS.unknown_message(name)}" for name in cfg.controls if name not in STREAMS]
        check(bool(cfg.evaluate) and len(set(cfg.evaluate)) == len(cfg.evaluate), "evaluate", cfg.evaluate,
              f"a non-empty list of {', '.join(EVALUATIONS)}, each once")
        check(not cfg.evaluate or "zeroshot" in cfg.evaluate or cfg.vqa.model is not None, "evaluate", cfg.evaluate,
              "zeroshot, or vqa with a vqa.model: a run evaluates something")
        if cfg.control_subset is not None:
            check(cfg.control_subset >= 1, "control_subset", cfg.control_subset, "an integer >= 1, or null for all images")
        from benchmark.backbones import check_backbone_string

        for spec in _as_list(cfg.backbone):
            try:
                check_backbone_string(spec)
            except ValueError as err:
                problems.append(f"backbone: {err}")
        for shots in _as_list(cfg.shots):
            check(shots == ALL_SHOTS or isinstance(shots, int) and not isinstance(shots, bool) and shots >= 1, "shots",
                  shots, f"an integer >= 1, or {ALL_SHOTS} (every training image of a session's classes)")
        for seed in _as_list(cfg.seed):
            check(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX, "seed", seed,
                  f"an integer in [0, {SEED_MAX}]")
        check(cfg.sessions >= 1, "sessions", cfg.sessions, "an integer >= 1")
        check(cfg.shot_seed is None or 0 <= cfg.shot_seed <= SEED_MAX, "shot_seed", cfg.shot_seed,
              f"an integer in [0, {SEED_MAX}], or null for the run's seed")
        check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith(("cuda", "mps")),
              "device", cfg.device, "auto, cpu, cuda, cuda:N or mps")
        check(cfg.name not in ("", ".", "..") and "/" not in cfg.name and "\0" not in cfg.name, "name", cfg.name,
              "one folder name (not empty, '.' or '..'; no '/')")
        check(cfg.validation_per_class is None or cfg.validation_per_class >= 1, "validation_per_class",
              cfg.validation_per_class, "an integer >= 1, or null (evaluate on the test splits)")
    strategies = [n for n in _as_list(cfg.strategy) if isinstance(n, str) and n in STRATEGIES]
    if cfg.ddp:
        problems += [f"ddp: strategy '{name}' does not support data-parallel training (its statistics would differ "
                     f"between processes); allowed: ddp: false, or strategies "
                     f"{', '.join(n for n in STRATEGIES.names() if STRATEGIES.get(n).obj.supports_ddp)}"
                     for name in strategies if not getattr(STRATEGIES.get(name).obj, "supports_ddp", False)]
    used = [*strategies, *(n for n in [*_as_list(cfg.stream), *cfg.controls] if isinstance(n, str) and n in STREAMS)]
    for name in dict.fromkeys([*cfg.options, *used]):
        with collecting(problems):
            _validate_section(cfg, name, cfg.options.get(name, {}))


def _validate_section(cfg: Config, name: str, section: Any) -> None:
    """Check the option section of strategy or stream ``name`` (raises :class:`ConfigError`)."""
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: invalid value {section!r}; allowed: a mapping of option keys")
    if name in STRATEGIES and TRAIN in section:  # the strategy's own training keys, over cfg.train
        if not isinstance(section[TRAIN], dict):
            raise ConfigError(f"{name}.train: invalid value {section[TRAIN]!r}; allowed: a mapping of train keys")
        try:
            from_dict(TrainConfig, {**dataclasses.asdict(cfg.train), **section[TRAIN]}, prefix=f"{name}.train")
        except ConfigError as err:  # a cross-field check names train.<key>: say whose recipe it is
            raise ConfigError(*(p if p.startswith(f"{name}.") else f"{name}: {p}" for p in err.problems)) from None
    for registry in (STRATEGIES, STREAMS):
        if name in registry:
            entry = registry.get(name)
            own = {k: v for k, v in section.items() if not (registry is STRATEGIES and k == TRAIN)}
            if entry.options is None:
                check(not own, name, section, f"nothing: {registry.kind} '{name}' takes no options"
                      + (" but its own train keys" if registry is STRATEGIES else ""))
            else:
                cfg.options_for(name, entry.options)
