"""``fscl data check`` and ``fscl pretrain-mini [--vlm]``: the verbs this package adds to the command line.

Named in the ``fscl.commands`` entry-point group (setup.cfg); only the parsers live here, the
handlers import the work, so ``fscl --help`` stays light.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmark.errors import FsclError


def add_data(verbs: argparse._SubParsersAction) -> None:
    """``fscl data check STREAM --root DIR [-o key=value ...]``."""
    data = verbs.add_parser("data", help="check a stream's data on disk",
                            description="Data tools. 'check' validates a stream's root before a run.")
    actions = data.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="validate a stream's root: layout, counts per split/class/session, unreadable files",
        description="Build the stream on DIR, count its images per split, class and session, decode every image "
                    "(a run reads only the images it uses: this finds every unreadable file). "
                    "Exit code 0 only when the stream is usable.",
        epilog="examples:\n  fscl data check gtsrb --root /data\n"
               "  fscl data check imagefolder --root /data -o root=imagenet/val -o class_names=names.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("stream", metavar="STREAM", help="stream name (see 'fscl ls streams')")
    check.add_argument("--root", required=True, metavar="DIR",
                       help="the data_root holding the stream's folder, or that folder itself (our name for it or "
                            "the released code's, e.g. toyota_smarthome_images for tsi)")
    check.add_argument("-o", "--option", action="append", default=[], metavar="key=value",
                       help="a stream option, as in the stream's config section (repeatable; see 'fscl ls streams -v')")
    check.add_argument("--sessions", type=int, default=None,
                       help="sessions to split the classes into (default 5; a sequence: one per dataset)")
    check.add_argument("--shots", type=int, default=None, help="flag classes with fewer training images")
    check.add_argument("--no-progress", action="store_true", help="no progress bars")
    check.set_defaults(func=_data_check)


def add_pretrain_mini(verbs: argparse._SubParsersAction) -> None:
    """``fscl pretrain-mini [--vlm] [--seed S] [--steps N] [--out DIR] [--force]``."""
    mini = verbs.add_parser(
        "pretrain-mini", help="pretrain the mini world's tiny open_clip model, or with --vlm its small VLM (offline)",
        description="Pretrain the mini world's tiny ViT with the CLIP loss on clean renders and save it in "
                    "open_clip's local-dir layout with a manifest (seed, steps, data version, zero-shot "
                    "accuracies) under $FSCL_CACHE (default ~/.cache/fscl). The 'mini' backbone loads it. "
                    "With --vlm, build the mini world's small LLaVA-shaped VLM (not LLaVA: the mini encoder in its "
                    "tower, its image head as the projector, a small Llama set to compare the image embedding with "
                    "the class names' text embeddings) into the cache; vqa.model: mini loads it. Both are otherwise "
                    "built on first use.")
    mini.add_argument("--vlm", action="store_true",
                      help="build the mini VLM (on the cached mini model, pretrained first when missing)")
    mini.add_argument("--seed", type=int, default=0, help="seed (default 0; same seed, same weights)")
    mini.add_argument("--steps", type=int, default=None,
                      help="the mini model's optimizer steps (default: the recipe's; the mini VLM has none)")
    mini.add_argument("--out", default=None, metavar="DIR", help="model folder (default: the cache's)")
    mini.add_argument("--force", action="store_true", help="rebuild even when the model exists")
    mini.add_argument("--no-progress", action="store_true", help="no progress bar")
    mini.set_defaults(func=_pretrain_mini)


def _data_check(args: argparse.Namespace) -> int:
    """Exit 0 only when the stream is usable on that root (1: it is not)."""
    from benchmark.config import stream_options
    from streams.check import check_stream

    options = stream_options(args.stream, args.option)
    report = check_stream(args.stream, args.root, options, sessions=args.sessions, shots=args.shots,
                          progress=not args.no_progress)
    print(report.text())
    return 0 if report.ok else 1


def _pretrain_mini(args: argparse.Namespace) -> int:
    """Pretrain the mini world's model (or with --vlm its VLM) into the cache (or --out); print what it reached."""
    if args.vlm:
        from streams.mini.vlm import WEIGHTS, build
        from streams.mini.vlm import VLMConfig as Recipe
        from streams.mini.vlm import default_vlm_dir as default_dir
        what, scores, label = "mini VLM", "vqa_acc", "VQA accuracy (letter)"
    else:
        from streams.mini.backbone import WEIGHTS
        from streams.mini.backbone import default_model_dir as default_dir
        from streams.mini.pretrain import PretrainConfig as Recipe
        from streams.mini.pretrain import pretrain as build
        what, scores, label = "mini model", "zero_shot_top1", "zero-shot top-1"
    if args.vlm and args.steps:
        raise FsclError("pretrain-mini --vlm --steps: the mini VLM is built, not trained (drop --steps, or --vlm to "
                        "pretrain the mini model)")
    folder = Path(args.out) if args.out else default_dir(args.seed)
    if (folder / WEIGHTS).is_file() and not args.force:
        print(f"the {what} is already in {folder} (--force rebuilds it)")
        return 0
    cfg = Recipe(seed=args.seed)
    if args.steps:
        cfg.steps = args.steps
    manifest = build(folder, cfg, progress=not args.no_progress)
    steps = f"{manifest['steps']} steps, " if "steps" in manifest else ""
    print(f"{what} -> {folder} ({steps}{manifest['train_seconds']:.0f} s)")
    for name, acc in manifest[scores].items():
        print(f"  {label} {name:<18} {100 * acc:5.1f} %")
    return 0
