"""``fscl vqa build``: the verb this package adds to the command line.

Named in the ``fscl.commands`` entry-point group (setup.cfg); only the parser lives here, the
handler imports the work, so ``fscl --help`` stays light.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

MODES = ("random", "hard")  # benchmark.vqa.questions.MODES, without importing numpy


def add_vqa(verbs: argparse._SubParsersAction) -> None:
    """``fscl vqa build STREAM --root DIR [--mode random|hard] [--backbone B] [--seed N] [--out FILE]``."""
    vqa = verbs.add_parser("vqa", help="multiple-choice VQA question sets of a stream's test images",
                           description="VQA tools. 'build' writes a stream's frozen question set.")
    actions = vqa.add_subparsers(dest="vqa_verb", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build", help="write the multiple-choice question set of a stream's test images (versioned JSON + sha256)",
        description="One question per test image: the stream's question (its data file's vqa_question), "
                    "K = min(5, classes) options with the right class at a uniformly drawn position and "
                    "distractor classes drawn at random or, with --mode hard, among the nearest classes by the "
                    "pretrained --backbone's text embeddings. Seeded per image (same file on every machine). "
                    "A stream with its own questions (vsr, hm, mmvp, visonlyqa) writes those (no mode, seed or "
                    "backbone). Prints the file, its item count, the right answers' histogram and its sha256.",
        epilog="examples:\n  fscl vqa build gtsrb --root /data\n"
               "  fscl vqa build gtsrb --root /data --mode hard --backbone openclip:ViT-L-14-336-quickgelu@openai",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("stream", metavar="STREAM", help="stream name (see 'fscl ls streams')")
    build.add_argument("--root", required=True, metavar="DIR", help="the data_root holding the stream's folder")
    build.add_argument("--mode", choices=MODES, default="random", help="distractor classes (default: random)")
    build.add_argument("--backbone", default=None, metavar="LOAD_STRING",
                       help="--mode hard: the pretrained model whose text embeddings rank the classes")
    build.add_argument("--seed", type=int, default=0, help="question seed (default 0)")
    build.add_argument("--out", default=None, metavar="FILE",
                       help="file to write (default: DIR/vqa/<stream>-<mode>-s<seed>.json)")
    build.add_argument("-o", "--option", action="append", default=[], metavar="key=value",
                       help="a stream option, as in the stream's config section (repeatable)")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    """Build, freeze and describe one stream's question set."""
    from benchmark.config import stream_options
    from benchmark.registry import STREAMS
    from benchmark.vqa.build import build_question_set, default_path

    options = stream_options(args.stream, args.option)
    questions = build_question_set(STREAMS.get(args.stream).obj(args.root, options), args.mode, args.seed, args.backbone)
    out = Path(args.out) if args.out else default_path(args.root, args.stream, args.mode, args.seed, args.backbone)
    digest = questions.save(out)
    if questions.prompts == "own":
        what = "its own"
        counts = Counter(item.choices[item.answer] for item in questions.items)
    else:
        what, counts = f"{args.mode} distractors, seed {args.seed}", Counter(questions.letter_counts())
    answers = "  ".join(f"{answer} {n}" for answer, n in sorted(counts.items()))
    print(f"{args.stream}: {len(questions.items)} questions ({what}) -> {out}\n"
          f"  right answers: {answers}\n  sha256: {digest}")
    return 0
