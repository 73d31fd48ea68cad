"""VQA as an evaluation of a run: the question sets of the run's own test images and the scores of the run's
current encoder in the VLM's vision tower (the VLM of ``vqa.model``, loaded once per process by its family:
:meth:`benchmark.vlm.base.VLMFamily.loaded`).

Nothing here draws from the global RNGs (the VLM and the ``hard`` mode's backbone load under
``torch.random.fork_rng``), so a run scores the same top-1 numbers with VQA on or off.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmark.vlm.base import LoadedVLM
from benchmark.vqa.questions import MultipleChoiceSet


@dataclass(frozen=True)
class VQASet:
    """One dataset's questions with their images (``LabelledImages`` in the same order, no transform) and the
    indices asked on the subset basis, after every session (``subset``; None: all)."""

    name: str
    questions: MultipleChoiceSet
    images: Any
    subset: list[int] | None = None

    def key(self, full: bool) -> str:
        """What a score of the set asks: its name for all its questions (``full``, or no subset), else
        ``<name>@subset``."""
        return self.name if full or self.subset is None else f"{self.name}@subset"

    def record(self, mode: str, seed: int) -> dict[str, Any]:
        """What the manifest keeps about the set (``vqa_sets``)."""
        entry = {"sha256": self.questions.sha256, "mode": mode, "seed": seed, "items": len(self.questions.items)}
        return entry if self.subset is None else {**entry, "subset": len(self.subset)}


def build_sets(tests: dict[str, tuple[Any, Any]], mode: str, seed: int, backbone: str) -> list[VQASet]:
    """The question set (named ``name``) of each ``name -> (stream, test images)``, read from the cache folder
    or built there on first use (:func:`~benchmark.vqa.build.cached_question_set`); ``hard`` ranks distractors
    with the pretrained ``backbone``."""
    from benchmark.cache import cache_root
    from benchmark.vqa.build import cached_question_set

    sets = []
    with torch.random.fork_rng(devices=[]):  # hard mode loads the backbone: its init must not move the run's RNG
        for name, (stream, test) in tests.items():
            questions = cached_question_set(name, stream, test, mode, seed, backbone if mode == "hard" else None,
                                            cache_root())
            sets.append(VQASet(name, questions, test.with_transform(None)))
    return sets


def score_set(vlm: LoadedVLM, qset: VQASet, batch_size: int, full: bool = True, scoring: str = "letter",
              progress: bool = False) -> dict[str, int | float]:
    """Counts of the set's questions (its subset unless ``full``) with the VLM's current tower, summed over
    the processes of a data-parallel run (each scores its strided share, :func:`~benchmark.distributed.eval_indices`).

    ``letter``: ``total``, ``correct`` (the most probable of the K letters is right), ``strict_correct`` (the most
    probable token is the right letter) and ``letter_mass`` (the probability on the K letters, summed over questions).
    ``generate``: ``total``, ``correct`` (the released greedy answer parses to the right option; see
    :meth:`~benchmark.vqa.questions.QuestionSet.judge`) and ``parsed`` (answers that name one of the options).
    ``progress``: a progress bar over this process's questions.
    """
    from benchmark.distributed import all_reduce_sum, eval_indices
    from benchmark.vqa.scorer import generate_answers, letter_scores

    asked = range(len(qset.questions.items)) if full or qset.subset is None else qset.subset
    mine = [asked[i] for i in eval_indices(len(asked))]
    counts: dict[str, int | float] = ({"correct": 0, "strict_correct": 0, "letter_mass": 0.0} if scoring == "letter"
                                      else {"correct": 0, "parsed": 0})
    bar = tqdm(total=len(mine), desc=f"vqa {qset.name}", unit="q", leave=False, disable=not progress)
    for start in range(0, len(mine), batch_size):
        items = [qset.questions.items[i] for i in mine[start:start + batch_size]]
        batch = [(qset.images[i][0], vlm.prompt(qset.questions.prompt(item)), len(item.choices))
                 for i, item in zip(mine[start:start + batch_size], items)]
        if scoring == "letter":
            for score, item in zip(letter_scores(vlm, batch), items):
                counts["correct"] += score.choice == item.answer
                counts["strict_correct"] += score.top_letter == item.answer
                counts["letter_mass"] += score.letter_mass
        else:
            for answer, item in zip(generate_answers(vlm, batch), items):
                right, parsed = qset.questions.judge(answer, item)
                counts["correct"] += right
                counts["parsed"] += parsed
        bar.update(len(items))
    bar.close()
    summed = all_reduce_sum([len(mine), *counts.values()])
    return {"total": summed[0], **dict(zip(counts, summed[1:]))}


def vqa_row_key(vqa: Any, qset: VQASet, encoder: str, context: dict[str, Any], full: bool = True) -> str:
    """SHA-256 (hex) of what the counts of ``qset`` (all its questions, or its subset unless ``full``) with a
    pretrained encoder depend on, for the grid's shared row 0 (:mod:`benchmark.shared_rows`): ``encoder`` (its
    :func:`~benchmark.evaluation.model_fingerprint`), the VLM (its family's ``identity``),
    the questions (their SHA-256), the subset's indices when asked, the images
    (:func:`~benchmark.image_cache.sources_key`), ``vqa``'s scoring and batch size, the number of processes and
    ``context`` (device, library versions)."""
    import transformers

    from benchmark.distributed import world_size
    from benchmark.image_cache import sources_key
    from benchmark.vlm.spec import resolve_vlm

    described = {"encoder": encoder, "vqa_model": resolve_vlm(vqa.model).identity(), "questions": qset.questions.sha256,
                 "images": sources_key(qset.images), "scoring": vqa.scoring, "batch_size": vqa.batch_size,
                 "world_size": world_size(), "transformers": transformers.__version__, **context,
                 **({} if full or qset.subset is None else {"subset": qset.subset})}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def vqa_rows(session: int, dataset: str, counts: dict[str, int | float], scoring: str,
             suffix: str = "") -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` rows of one set's :func:`score_set` counts, each naming its ``scoring``:
    ``vqa_acc`` and, by letter, ``vqa_acc_strict`` (with correct/total) and ``vqa_letter_mass`` (mean, with
    total); by generation ``vqa_parsed`` (the share of answers naming an option, with total). ``suffix`` ends
    every metric's name (``_subset``: the counts of the set's subset)."""
    total = counts["total"]
    base = {"session": session, "dataset": dataset, "total": total, "scoring": scoring}
    rows = [{**base, "metric": "vqa_acc", "value": counts["correct"] / total, "correct": counts["correct"]}]
    if scoring == "letter":
        rows += [{**base, "metric": "vqa_acc_strict", "value": counts["strict_correct"] / total,
                  "correct": counts["strict_correct"]},
                 {**base, "metric": "vqa_letter_mass", "value": counts["letter_mass"] / total}]
    else:
        rows.append({**base, "metric": "vqa_parsed", "value": counts["parsed"] / total})
    return [{**row, "metric": row["metric"] + suffix} for row in rows]
