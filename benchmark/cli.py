"""The ``fscl`` command line (also ``python -m benchmark``)."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import benchmark  # noqa: F401  (torchvision repair before anything else)
import reports  # noqa: F401
import strategies  # noqa: F401  (the CLI is the one place that imports all four packages)
import streams  # noqa: F401
from benchmark.backbones.openclip import BackboneLoadError
from benchmark.config import DEFAULT_PRESET, ConfigError, list_presets, load_config
from benchmark.distributed import grid_shard, is_main_process, launched_processes
from benchmark.export import FORMATS as EXPORT_FORMATS
from benchmark.registry import BACKBONES, STRATEGIES, STREAMS, UnknownNameError
from streams import StreamDataError

log = logging.getLogger("fscl")


def _cmd_run(args: argparse.Namespace) -> int:
    from benchmark.runner import run_dir, run_grid

    source, overrides = args.config, list(args.overrides)
    if source is not None and "=" in source:  # `fscl run seed=1`: no preset given, only overrides
        source, overrides = None, [source, *overrides]
    cfg = load_config(source, overrides)
    runs = cfg.expand()
    if args.dry_run:
        shard = grid_shard(launcher=not cfg.ddp)
        mine = shard.select(runs)
        print(f"{len(runs)} run(s) of '{cfg.name}'" + (f", {len(mine)} in shard {shard}" if shard.count > 1 else "") + ":")
        for run in mine:
            print(f"  {run_dir(run)}")
        return 0
    outcomes = run_grid(cfg, progress=not args.no_progress)
    if not is_main_process():  # ddp: true: rank 0 reports for the group
        return 0
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


def _cmd_demo(args: argparse.Namespace) -> int:
    """The offline benchmark end to end: the default preset, then its report."""
    from reports import write_report

    args.config, args.dry_run = DEFAULT_PRESET, False
    status = _cmd_run(args)
    cfg = load_config(DEFAULT_PRESET, args.overrides)
    runs = Path(cfg.out) / cfg.name
    paths = write_report(runs, runs / "report")
    print(f"report: {paths.markdown}\n        {paths.html}")
    return status


def _cmd_report(args: argparse.Namespace) -> int:
    """Tables, figures and report.md/.html of a runs folder; failed or partial runs are listed, not averaged."""
    from reports import ReportError, write_report

    try:
        paths = write_report(args.runs_dir, args.out, reference=args.reference)
    except ReportError as err:
        print(f"fscl: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {paths.markdown}, {paths.html} ({len(paths.figures)} figure files, tables in "
          f"{paths.results_csv.name} / {paths.results_latex.name})")
    if paths.excluded:
        print(f"  {len(paths.excluded)} failed or partial run(s) left out; listed in the report", file=sys.stderr)
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    if args.what == "presets":
        for name in list_presets():
            print(name)
        return 0
    registry = {"streams": STREAMS, "strategies": STRATEGIES, "backbones": BACKBONES}[args.what]
    for entry in registry.entries():
        print(f"{entry.name:<16} {entry.summary}")
        own = vars(entry.obj) if isinstance(entry.obj, type) else {}  # a subclass family does not repeat its base's
        for label, values in (("load", own.get("load_forms", ())), ("tags", own.get("known_tags", ()))):
            for value in values:  # backbone families: load-string forms and known pretrained tags
                print(f"{'':<18}{label}: {value}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """Write a run's vision encoder after one session as an open_clip folder or an HF CLIPVisionModel folder."""
    from benchmark.export import ExportError, export

    try:
        out = export(args.run_dir, args.session, args.format, args.out)
    except ExportError as err:
        print(f"fscl: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.format} encoder after session {args.session} -> {out}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    """Exit 0 only when the stream is usable on that root (1: it is not)."""
    import yaml

    from benchmark.config import from_dict
    from streams.check import check_stream

    entry = STREAMS.get(args.stream)
    values = {}
    for option in args.option:
        key, sep, raw = option.partition("=")
        if not sep:
            raise ConfigError(f"--option '{option}' must look like key=value")
        values[key] = yaml.safe_load(raw) if raw.strip() else ""
    if values and entry.options is None:
        raise ConfigError(f"stream '{args.stream}' takes no options")
    options = from_dict(entry.options, values, prefix=args.stream) if entry.options else None
    report = check_stream(args.stream, args.root, options, sessions=args.sessions, shots=args.shots,
                          progress=not args.no_progress)
    print(report.text())
    return 0 if report.ok else 1


def _cmd_pretrain_mini(args: argparse.Namespace) -> int:
    """Pretrain the mini world's model into the cache (or --out) and print what it reached."""
    from streams.mini.backbone import WEIGHTS, default_model_dir
    from streams.mini.pretrain import PretrainConfig, pretrain

    folder = Path(args.out) if args.out else default_model_dir(args.seed)
    if (folder / WEIGHTS).is_file() and not args.force:
        print(f"the mini model is already in {folder} (--force rebuilds it)")
        return 0
    cfg = PretrainConfig(seed=args.seed)
    if args.steps:
        cfg.steps = args.steps
    manifest = pretrain(folder, cfg, progress=not args.no_progress)
    print(f"mini model -> {folder} ({manifest['steps']} steps, {manifest['train_seconds']:.0f} s)")
    for name, acc in manifest["zero_shot_top1"].items():
        print(f"  zero-shot top-1 {name:<18} {100 * acc:5.1f} %")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
               "train.epochs=2\n  fscl run quick --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", nargs="?", default=None,
                     help="preset name (see 'fscl ls presets') or YAML file; default: the offline preset")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted overrides; lists (a,b or [a,b]) on stream/strategy/backbone/shots/seed make a grid")
    run.add_argument("--dry-run", action="store_true",
                     help="print the runs of the grid (of this process's shard, when sharded) and exit")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    demo = verbs.add_parser("demo", help="run the offline benchmark end to end (no download)",
                            description=f"Run the offline default preset '{DEFAULT_PRESET}' end to end.")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for 'run'")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    ls = verbs.add_parser("ls", help="list registered streams, strategies, backbones or presets",
                          description="List what is registered (including plugins of other packages).")
    ls.add_argument("what", choices=["streams", "strategies", "backbones", "presets"])
    ls.set_defaults(func=_cmd_ls)

    data = verbs.add_parser("data", help="check a stream's data on disk",
                            description="Data tools. 'check' validates a stream's root before a run.")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    data_check = data_verbs.add_parser(
        "check", help="validate a stream's root: layout, counts per split/class/session, unreadable files",
        description="Build the stream on DIR, count its images per split, class and session, decode every image. "
                    "Exit code 0 only when the stream is usable.",
        epilog="examples:\n  fscl data check gtsrb --root /data\n"
               "  fscl data check imagefolder --root /data -o root=imagenet/val -o class_names=names.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    data_check.add_argument("stream", metavar="STREAM", help="stream name (see 'fscl ls streams')")
    data_check.add_argument("--root", required=True, metavar="DIR",
                            help="the data_root holding the stream's folder (or that folder itself)")
    data_check.add_argument("-o", "--option", action="append", default=[], metavar="key=value",
                            help="a stream option, as in the stream's config section (repeatable)")
    data_check.add_argument("--sessions", type=int, default=5, help="sessions to split the classes into (default 5)")
    data_check.add_argument("--shots", type=int, default=None, help="flag classes with fewer training images")
    data_check.add_argument("--no-progress", action="store_true", help="no progress bars")
    data_check.set_defaults(func=_cmd_data_check)

    report = verbs.add_parser(
        "report", help="tables, figures and a Markdown/HTML report of a runs folder",
        description="Aggregate finished runs (mean ± std over seeds, paired tests against a reference strategy) "
                    "into report.md, report.html, results.csv/.tex and figures/; failed or partial runs are listed "
                    "and left out.",
        epilog="example:\n  fscl report runs/quick --out report/quick --reference full-ft",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("runs_dir", metavar="RUNS_DIR", help="folder of run records ('fscl run' output)")
    report.add_argument("--out", required=True, metavar="DIR", help="folder to write the report into")
    report.add_argument("--reference", default="lorsu",
                        help="strategy the others are tested against, paired by seed (default: lorsu)")
    report.set_defaults(func=_cmd_report)

    export = verbs.add_parser(
        "export", help="write a run's updated vision encoder for the VLM that uses it",
        description="Write the vision encoder after session N of a run (from its per-session checkpoint; run with "
                    "keep_checkpoints=all to keep every session, =last for the final one; session 0 is the "
                    "pretrained encoder) as an open_clip local-dir folder or, for OpenAI-layout CLIP ViTs, as a "
                    "transformers CLIPVisionModel folder (the form LLaVA-1.5's vision tower loads).",
        epilog="example:\n  fscl export runs/quick/digits/openclip-ViT-L-14-336/lorsu/5-s0 --session 5 "
               "--format hf-clip-vision --out tower/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run_dir", metavar="RUN_DIR", help="one run's folder (written by 'fscl run')")
    export.add_argument("--session", type=int, required=True, metavar="N", help="after which session (0: pretrained)")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    export.set_defaults(func=_cmd_export)

    mini = verbs.add_parser(
        "pretrain-mini", help="pretrain the mini world's tiny open_clip model (offline; not CLIP)",
        description="Pretrain the mini world's tiny ViT with the CLIP loss on clean renders and save it in "
                    "open_clip's local-dir layout with a manifest (seed, steps, data version, zero-shot "
                    "accuracies) under $FSCL_CACHE (default ~/.cache/fscl). The 'mini' backbone loads it.")
    mini.add_argument("--seed", type=int, default=0, help="pretraining seed (default 0; same seed, same weights)")
    mini.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    mini.add_argument("--out", default=None, metavar="DIR", help="model folder (default: the cache's)")
    mini.add_argument("--force", action="store_true", help="rebuild even when the model exists")
    mini.add_argument("--no-progress", action="store_true", help="no progress bar")
    mini.set_defaults(func=_cmd_pretrain_mini)
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
    except (ConfigError, UnknownNameError, BackboneLoadError, StreamDataError) as err:
        print(f"fscl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
