"""The ``fscl`` command line (also ``python -m benchmark``).

The core's verbs are ``run``, ``tune``, ``ls`` and ``export``; other packages add theirs through the
``fscl.commands`` entry-point group (ours: ``report`` and ``demo`` from :mod:`reports.commands`,
``data`` and ``pretrain-mini`` from :mod:`streams.commands`). An entry names a function that
adds one verb to the parser (``add(verbs)``, ``verbs`` the sub-parsers of ``fscl``); the verb's
handler imports what it needs, so ``fscl --help``, every verb's ``--help`` and ``fscl ls``
never import torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import re
import shlex
import sys
import textwrap
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from benchmark.config import (
    DEMO_PRESET,
    PRESET_DIR,
    Config,
    ConfigError,
    TrainConfig,
    VQAConfig,
    describe_options,
    list_presets,
    load_config,
)
from benchmark.errors import FsclError
from benchmark.registry import BACKBONES, STRATEGIES, STREAMS, VLMS, Registry

log = logging.getLogger("fscl")

COMMAND_GROUP = "fscl.commands"
EXPORT_FORMATS = ("openclip", "hf-clip-vision", "hf-siglip-vision")  # benchmark.export.FORMATS, without importing torch
HELP_WIDTH = 100


def jobs_value(text: str) -> int | str:
    """``--jobs``'s value: ``auto`` or a whole number >= 1 (argparse's type)."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a whole number >= 1, or auto")
    return int(text)


def add_jobs_argument(parser: argparse.ArgumentParser, default: int | str) -> None:
    """``--jobs N|auto`` of the verbs that run a grid."""
    parser.add_argument("--jobs", type=jobs_value, default=default, metavar="N",
                        help="run the grid's pending runs in N local processes, each run in one process with the "
                             "same numbers (auto: on the CPU one process per core or OMP_NUM_THREADS thread, each "
                             f"one thread; on a GPU 1); default {default}")


def _load(args: argparse.Namespace) -> tuple[Config, str]:
    """The config of ``fscl run``/``tune`` (a preset or file, and overrides), and where it comes from in words."""
    source, overrides = args.config, list(args.overrides)
    if source is not None and "=" in source:  # `fscl run seed=1`: no preset given, only overrides
        source, overrides = None, [source, *overrides]
    origin = f"preset '{source}'" if source in list_presets() else f"'{source}'" if source else "the defaults (no preset)"
    return load_config(source, overrides), origin


def _source(args: argparse.Namespace) -> str | None:
    """The preset or file of ``fscl run``/``tune`` (None: the defaults), as given."""
    return args.config if args.config is not None and "=" not in args.config else None


def _dry_run(cfg: Config, what: str, force: bool, jobs: int | str = 1, probe: bool = False, verbose: bool = False,
             source: str | None = None) -> int:
    """Check this process's share of the grid ``cfg`` as a run would, then say what it will and will not produce
    (:mod:`benchmark.dryrun`: its axes, runs to do and finished runs skipped, VQA, weights, warnings) and what the
    runs to do cost (training steps, evaluated images, an estimated wall time: :mod:`benchmark.estimate`)."""
    from benchmark.distributed import grid_shard, local_device
    from benchmark.dryrun import grid_lines, grid_warnings, output_lines
    from benchmark.estimate import estimate_lines
    from benchmark.grid import check_grid
    from benchmark.records import RunRecord
    from benchmark.runs import is_done, run_dir

    runs = cfg.expand()
    shard = grid_shard(launcher=not cfg.ddp)
    mine = shard.select(runs)
    device = local_device(cfg.device)
    data = check_grid(mine, force, jobs)  # the checks a real run makes before any work
    done = [is_done(RunRecord(run_dir(run), writable=False), run.to_dict(), force) for run in mine]
    summary = grid_lines(cfg, mine, done, [run_dir(run) for run in mine], verbose)
    print(f"{len(runs)} run(s) of '{cfg.name}' from {what}" + (f", {len(mine)} in shard {shard}" if shard.count > 1
                                                                else "") + f": {summary[0]}")
    print("\n".join([*summary[1:], *output_lines(cfg, mine)]))
    warnings = grid_warnings(cfg, mine, source)
    if warnings:
        print("warnings:\n" + "\n".join(f"  {line}" for line in warnings))
    todo = [(run, d) for run, d, finished in zip(mine, data, done) if not finished]
    if not todo:
        print("cost: none, every run is finished")
        return 0
    print(f"cost of the {len(todo)} run(s) to do" + (" of this shard" if shard.count > 1 else "") + ":")
    lines = estimate_lines([run for run, _ in todo], [d for _, d in todo], device, jobs, probe)
    print("\n".join(f"  {line}" for line in lines))
    return 0


def _run_grid(cfg: Config, what: str, args: argparse.Namespace) -> int | None:
    """Run this process's share of the grid ``cfg``; on the main process print the outcomes and return the exit
    status (None on the other ranks of a ``ddp`` run)."""
    from benchmark.distributed import is_main_process, launched_processes
    from benchmark.grid import run_grid

    if is_main_process():
        print(f"{len(cfg.expand())} run(s) of '{cfg.name}' from {what}", file=sys.stderr)
    outcomes = run_grid(cfg, progress=not args.no_progress, force=getattr(args, "force", False),
                        jobs=getattr(args, "jobs", 1))
    if not is_main_process():  # ddp: true: rank 0 reports for the group
        return None
    counts = {s: sum(o.status == s for o in outcomes) for s in ("finished", "skipped", "failed", "busy")}
    busy = f", {counts['busy']} busy (in use by another process)" if counts["busy"] else ""
    print(f"{counts['finished']} finished, {counts['skipped']} skipped (already done), {counts['failed']} failed"
          f"{busy} -> {cfg.out}/{cfg.name}")
    for outcome in outcomes:
        if outcome.status in ("failed", "busy"):
            print(f"  {outcome.status.upper()} {outcome.path}: {outcome.reason}", file=sys.stderr)
    if not (counts["failed"] or counts["busy"]):
        return 0
    if launched_processes() > 1 and not cfg.ddp:
        # torchrun / accelerate launch stop every other process when one exits non-zero: they
        # would cut short the other shards' runs. The failures are in the manifests and reports.
        print("  (exit status 0 under a multi-process launcher, so that the other shards go on)", file=sys.stderr)
        return 0
    return 1


def run_command(args: argparse.Namespace) -> int:
    """``fscl run`` (and the first half of ``fscl demo``): run, or with ``--dry-run`` list, a grid."""
    if getattr(args, "probe", False) and not args.dry_run:
        raise ConfigError("--probe measures rates for the estimate of --dry-run; give both (or neither)")
    cfg, origin = _load(args)
    if args.dry_run:
        return _dry_run(cfg, origin, getattr(args, "force", False), args.jobs, args.probe, args.list_runs,
                        _source(args))
    return _run_grid(cfg, origin, args) or 0


def tune_command(args: argparse.Namespace) -> int:
    """``fscl tune``: run the tune's validation grid (:mod:`benchmark.tune`), then write the tuned config."""
    from benchmark import tune
    from benchmark.distributed import is_main_process

    cfg, origin = _load(args)
    options = tune.TuneOptions(args.criterion, args.tolerance, args.validation_per_class)
    grid, left_out = tune.tune_grid(cfg, options)
    what = f"the tune of {origin}"
    if left_out:
        print(f"controls left out of the tune (no training split to draw validation images from): "
              f"{', '.join(left_out)}", file=sys.stderr)
    if args.dry_run:
        return _dry_run(grid, what, args.force, args.jobs, verbose=args.list_runs, source=_source(args))
    status = _run_grid(grid, what, args)
    if status is None or not is_main_process():
        return 0
    found, pending = tune.scores(grid.expand())
    if pending:
        print(f"{pending} tune run(s) not finished (other shards, or busy): run 'fscl tune' again with the same "
              f"arguments once they are, to write the tuned config", file=sys.stderr)
        return status
    rows = tune.table(found)
    decision = tune.decide(rows, options)
    out = tune.write(Path(args.out) if args.out else Path(grid.out) / grid.name / "tuned.yaml", cfg, origin,
                     options, grid, left_out, rows, decision)
    print("\n".join(tune.decision_lines(rows, decision, options)))
    print(f"tuned config -> {out} (fscl run {out})")
    return 0


def _value(value: Any) -> str:
    """A default as it is written in YAML (``true``, ``null``, ``"auto"``, ``1e-05``)."""
    return "required" if value is dataclasses.MISSING else json.dumps(value, ensure_ascii=False)


def option_lines(options: type, prefix: str, details: bool) -> list[str]:
    """``prefix.name: type = default`` per field of the dataclass ``options``, with ``details`` its help below."""
    lines = []
    for doc in describe_options(options):
        lines.append(f"    {prefix}.{doc.name}: {doc.type} = {_value(doc.default)}")
        if details:
            lines += textwrap.wrap(doc.help, HELP_WIDTH, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return lines


def preset_summary(name: str) -> str:
    """The first sentence of the comment that opens preset ``name``'s file (its one-line summary)."""
    lines = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()
    comment = " ".join(line.lstrip("#").strip() for line in itertools.takewhile(lambda x: x.startswith("#"), lines))
    return re.split(r"(?<=\.)\s", comment, maxsplit=1)[0]


def _cmd_ls(args: argparse.Namespace) -> int:
    if args.what == "presets":
        names = list_presets()
        width = max(map(len, names)) + 2
        print("\n".join(f"{name:<{width}}{preset_summary(name)}" if args.details else name for name in names))
        return 0
    if args.what in ("train", "vqa"):
        print("\n".join(option_lines({"train": TrainConfig, "vqa": VQAConfig}[args.what], args.what, args.details)))
        return 0
    registry: Registry = {"streams": STREAMS, "strategies": STRATEGIES, "backbones": BACKBONES, "vlms": VLMS}[args.what]
    for entry in registry.entries():
        print(f"{entry.name:<16} {entry.summary}")
        for label, values in (("load", entry.load_forms), ("tags", entry.known_tags)):
            for value in values:
                print(f"{'':<18}{label}: {value}")
        if args.details and entry.options is not None:
            print("\n".join(option_lines(entry.options, entry.name, details=True)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """Write a run's vision encoder after one session as an open_clip folder or an HF CLIPVisionModel /
    SiglipVisionModel folder, or its adapted VLM (``--format vlm``)."""
    from benchmark.export import ExportError, export, loading_snippet
    from benchmark.vlm.export import export_vlm, vlm_loading_snippet

    if args.format == "vlm":
        out = export_vlm(args.run_dir, args.session, args.out, args.vlm, args.merge)
        what, snippet = "merged VLM" if args.merge else "VLM adapter (PEFT)", vlm_loading_snippet(out)
    elif args.vlm is not None or args.merge:
        raise ExportError(f"--vlm and --merge go with --format vlm (the adapted VLM), not --format {args.format}")
    else:
        out = export(args.run_dir, args.session, args.format, args.out)
        what, snippet = "encoder", loading_snippet(args.format, out)
    print(f"{args.format} {what} after session {args.session} -> {out}\nload it in a script:\n")
    print(textwrap.indent(snippet, "    "))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``fscl``: the core's verbs, then those of the ``fscl.commands`` entry points."""
    from benchmark.tune import CRITERIA  # light: no torch
    parser = argparse.ArgumentParser(
        prog="fscl", description="Few-shot continual-learning benchmark for the vision encoders of VLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser(
        "run", help="run a preset or config file (a grid of continual runs)",
        description="Run every grid point of a preset or YAML config; finished runs are skipped, interrupted "
                    "ones resume after their last finished session. Launched as several processes "
                    "(accelerate launch / torchrun / a SLURM array) each process runs its share of the grid; "
                    "with ddp=true they train each run together (data parallel).",
        epilog="examples:\n  fscl run quick seed=0,1,2\n  fscl run my.yaml strategy=[zeroshot,full-ft] "
               "train.epochs=2\n  fscl run quick --dry-run\n\n"
               "keys: 'fscl ls train -v' and 'fscl ls vqa -v' list the train.* and vqa.* keys; 'fscl ls strategies -v'\n"
               "and 'fscl ls streams -v' the options of each strategy and stream (lorsu.rank=32);\n"
               "docs/configuration.md the others.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", nargs="?", default=None,
                     help="preset name (see 'fscl ls presets') or YAML file; default: none, the documented "
                          "defaults (the paper's recipe, no controls, named after the stream); the offline "
                          f"benchmark is 'fscl run {DEMO_PRESET}' or 'fscl demo'")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted overrides; lists (a,b or [a,b] on stream/strategy/backbone/shots/seed, [a,b] on "
                          "any key whose type is not a list, e.g. train.lr=[1e-5,1e-4]) make a grid")
    run.add_argument("--dry-run", action="store_true",
                     help="check the grid as a run would (options, device, data, runs folder, changed finished runs) "
                          "and summarise it (of this process's shard, when sharded): its axes, runs to do and finished "
                          "runs skipped (-v: every folder), what it produces (checkpoints, VQA on or off), where each "
                          "backbone's weights come from (local, cache, or a hub that needs internet), warnings of "
                          "unfair comparisons, and for the runs to do their training steps, evaluated images and VQA "
                          "questions and an estimate of their wall time from the rates of earlier runs")
    run.add_argument("--probe", action="store_true",
                     help="with --dry-run: estimate from rates measured now on this machine (per backbone a few full "
                          "fine-tuning steps and evaluation batches of random images, and with vqa.model a few VQA "
                          "batches of the target's questions) instead of earlier runs'")
    run.add_argument("--force", action="store_true",
                     help="run again (replacing the record) a finished run whose configuration changed, or that lacks "
                          "the checkpoints keep_checkpoints now asks for (to export them); without it a changed run "
                          "is refused, naming the keys that differ, and the other is skipped")
    run.add_argument("-v", "--verbose", dest="list_runs", action="store_true",
                     help="with --dry-run: list every run folder, to run or finished")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_jobs_argument(run, 1)
    run.set_defaults(func=run_command)

    tune = verbs.add_parser(
        "tune", help="choose each strategy's learning rate (or any swept key) on validation data",
        description="Run every strategy that trains over the swept keys (list values, e.g. train.lr=[1e-5,1e-4] or "
                    "lorsu.top_k_heads=[1,2,4]; none: train.lr on a log grid around the config's, x10^-0.5 .. "
                    "x10^1.5) on validation images held out of the target's training split and drawn from the "
                    "controls' training splits (no test split is read), then write a config that 'fscl run' takes, "
                    "with each strategy's chosen values and the validation table. Resumes and shards as 'fscl run'.",
        epilog="examples:\n  fscl tune mini stream=mini-signs seed=[0,1]\n"
               "  fscl tune paper-cl5 'train.lr=[3e-6,1e-5,3e-5]' --tolerance 2 --out tuned-cl5.yaml\n"
               "  fscl run runs/mini-tune/tuned.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    tune.add_argument("config", nargs="?", default=None, help="preset name or YAML file, as for 'run'")
    tune.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides; list values are swept")
    tune.add_argument("--criterion", default="constrained", choices=list(CRITERIA),
                      help="; ".join(f"{name}{' (default)' if name == 'constrained' else ''}: {text}"
                                     for name, text in CRITERIA.items()))
    tune.add_argument("--tolerance", type=float, default=1.0, metavar="PP",
                      help="control change allowed below the zero-shot model's, in percentage points (default 1)")
    tune.add_argument("--validation-per-class", type=int, default=10, metavar="N",
                      help="validation images per class of the target and of each control (default 10)")
    tune.add_argument("--out", default=None, metavar="FILE",
                      help="the tuned config to write (default: <out>/<name>-tune/tuned.yaml)")
    tune.add_argument("--dry-run", action="store_true", help="check the tune's grid and summarise its runs")
    tune.add_argument("-v", "--verbose", dest="list_runs", action="store_true",
                      help="with --dry-run: list every run folder, to run or finished")
    tune.add_argument("--force", action="store_true", help="as for 'run'")
    tune.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_jobs_argument(tune, 1)
    tune.set_defaults(func=tune_command)

    ls = verbs.add_parser(
        "ls", help="list registered streams, strategies, backbones, VLM families, presets or the train.* or vqa.* keys",
        description="List what is registered (including plugins of other packages), or the train.* or vqa.* keys.",
        epilog="examples:\n  fscl ls strategies -v    every strategy with its options (type, default, help)\n"
               "  fscl ls train -v         the training recipe's keys with their help\n"
               "  fscl ls vqa -v           the VQA evaluation's keys with their help\n"
               "  fscl ls vlms             the VLM families vqa.model can name, with their load forms",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("what", choices=["streams", "strategies", "backbones", "vlms", "presets", "train", "vqa"])
    ls.add_argument("-v", "--verbose", dest="details", action="store_true",
                    help="every option with its type, default and help text (streams, strategies, train, vqa); "
                         "each preset's one-line summary (presets)")
    ls.set_defaults(func=_cmd_ls)

    export = verbs.add_parser(
        "export", help="write a run's updated vision encoder for the VLM that uses it",
        description="Write the vision encoder after session N of a run (from its per-session checkpoint; run with "
                    "keep_checkpoints=all to keep every session, =last for the final one; session 0 is the "
                    "pretrained encoder) as an open_clip local-dir folder or, for OpenAI-layout CLIP ViTs, as a "
                    "transformers CLIPVisionModel folder (the form LLaVA-1.5's vision tower loads) or, for HF "
                    "SigLIP towers, a SiglipVisionModel folder (PaliGemma's tower; loads as hf-vision:DIR). "
                    "--format vlm writes instead the VLM that a VLM-side strategy (lora-llm, lora-llm-last, lora-vlm) "
                    "adapted: a PEFT adapter folder over the base VLM, or with --merge the whole merged VLM.",
        epilog="examples:\n  fscl export runs/quick/digits/openclip-ViT-L-14-336/lorsu/5-s0 --session 5 "
               "--format hf-clip-vision --out tower/\n"
               "  fscl export runs/quick/digits/openclip-ViT-L-14-336/lora-llm/5-s0 --session 5 --format vlm "
               "--merge --out adapted-vlm/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run_dir", metavar="RUN_DIR", help="one run's folder (written by 'fscl run')")
    export.add_argument("--session", type=int, required=True, metavar="N", help="after which session (0: pretrained)")
    export.add_argument("--format", required=True, choices=(*EXPORT_FORMATS, "vlm"))
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    export.add_argument("--vlm", metavar="SPEC", default=None,
                        help="with --format vlm: the base VLM as a vqa.model value (FAMILY:/path/to/folder, "
                             "'fscl ls vlms'); default the run's vqa.model (pass it when that folder has moved)")
    export.add_argument("--merge", action="store_true",
                        help="with --format vlm: write the VLM with the adapter merged into its weights (a whole "
                             "model, from_pretrained(DIR) alone) instead of a PEFT adapter folder")
    export.set_defaults(func=_cmd_export)

    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name):
        try:
            ep.load()(verbs)
        except Exception as err:  # a broken third-party verb must not take the others down
            log.warning("could not add the fscl command %s (%s): %s", ep.name, ep.value, err)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot intermix positionals and flags ('run quick --no-progress seed=1'):
    # collect the overrides it left over, refuse anything else.
    if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # `fscl ls backbones | head`
        return 0
    except FsclError as err:  # a config value, a name, a path, data: the message says what to change
        print(f"fscl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: the runs cut short are marked interrupted (benchmark.errors.Interrupted)
        command = shlex.join(["fscl", *(sys.argv[1:] if argv is None else argv)])
        what = f": {err}" if str(err) else " (between runs: none was cut short)"
        print(f"fscl: interrupted{what}; run the same command again to resume: {command}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
