"""VQA as an evaluation of a run: the question sets of the run's own test images and the scores of the run's
current encoder in the VLM's vision tower (the VLM of ``vqa.model``, loaded once per process by its family:
:meth:`benchmark.vlm.base.VLMFamily.loaded`).

Nothing here draws from the global RNGs (the VLM and the ``hard`` mode's backbone load under
``torch.random.fork_rng``), so a run scores the same top-1 numbers with VQA on or off.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmark.vlm.base import LoadedVLM
from benchmark.vqa.questions import MultipleChoiceSet, QuestionItem, QuestionSetError


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

    ``letter`` (:func:`~benchmark.vqa.scorer.option_scores` of the answers that name the options,
    :meth:`~benchmark.vqa.questions.QuestionSet.answers`): ``total``, ``correct`` (the preferred option is right),
    ``strict_correct`` (the most probable token at the deciding position is the right option's) and ``letter_mass``
    (the probability that the answer starts with an option, summed over questions); with the set's ``positive``
    answer, ``auroc`` (:func:`auroc`). ``generate``: ``total``, ``correct`` (the released greedy answer is right by
    the set's rule, :meth:`~benchmark.vqa.questions.QuestionSet.judge`) and ``parsed`` (answers that name one of the
    options). When items have ``group`` s, both: ``pairs_correct`` and ``pairs`` (:func:`pair_counts`).
    ``progress``: a progress bar over this process's questions.
    """
    from benchmark.distributed import all_reduce_sum, eval_indices
    from benchmark.vqa.scorer import generate_answers, option_scores

    questions = qset.questions
    asked = range(len(questions.items)) if full or qset.subset is None else qset.subset
    mine = eval_indices(len(asked))  # positions in ``asked``
    right = [0] * len(asked)  # 1: this process scored the question right
    positive = [0.0] * len(asked) if scoring == "letter" and questions.positive is not None else None
    counts: dict[str, int | float] = ({"strict_correct": 0, "letter_mass": 0.0} if scoring == "letter"
                                      else {"parsed": 0})
    bar = tqdm(total=len(mine), desc=f"vqa {qset.name}", unit="q", leave=False, disable=not progress)
    for start in range(0, len(mine), batch_size):
        positions = mine[start:start + batch_size]
        items = [questions.items[asked[p]] for p in positions]
        batch = [(qset.images[asked[p]][0], vlm.prompt(questions.prompt(item)), questions.answers(item))
                 for p, item in zip(positions, items)]
        if scoring == "letter":
            for p, score, item in zip(positions, option_scores(vlm, batch), items):
                right[p] = int(score.choice == item.answer)
                counts["strict_correct"] += score.top_option == item.answer
                counts["letter_mass"] += score.mass
                if positive is not None:
                    positive[p] = score.probs[positive_index(questions, item)]
        else:
            for p, answer, item in zip(positions, generate_answers(vlm, batch), items):
                judged, parsed = questions.judge(answer, item)
                right[p] = int(judged)
                counts["parsed"] += parsed
        bar.update(len(items))
    bar.close()
    summed = all_reduce_sum([len(mine), sum(right), *counts.values()])
    result = {"total": summed[0], "correct": summed[1], **dict(zip(counts, summed[2:]))}
    groups = [item.group for item in questions.items]
    if any(group is not None for group in groups):  # the same on every process: they gather together
        result |= pair_counts(groups, asked, all_reduce_sum(right))
    if positive is not None:
        labels = [questions.items[i].answer == positive_index(questions, questions.items[i]) for i in asked]
        value = auroc(labels, all_reduce_sum(positive))
        result |= {} if value is None else {"auroc": value}
    return result


def positive_index(questions: MultipleChoiceSet, item: QuestionItem) -> int:
    """The option of ``item`` whose answer is the set's ``positive`` one; :class:`QuestionSetError` without one."""
    answers = questions.answers(item)
    if questions.positive not in answers:
        raise QuestionSetError(f"{questions.name}: item {item.id!r} has the answers {list(answers)}, without the "
                               f"set's positive answer {questions.positive!r} that the AUROC ranks by")
    return answers.index(questions.positive)


def pair_counts(groups: Sequence[str | None], asked: Sequence[int], right: Sequence[int]) -> dict[str, int]:
    """Pair accuracy's counts (MMVP's metric): ``pairs``, the groups (``groups[i]``: item ``i``'s, None: none) whose
    every item is asked (``asked``: item indices; ``right[k]``: 1 when ``asked[k]`` was answered right), and
    ``pairs_correct``, those whose every item is right; nothing when no group is whole."""
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        if group is not None:
            members.setdefault(group, []).append(i)
    verdict = dict(zip(asked, right))
    whole = [items for items in members.values() if all(i in verdict for i in items)]
    if not whole:
        return {}
    return {"pairs_correct": sum(all(verdict[i] for i in items) for items in whole), "pairs": len(whole)}


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve of ``scores`` ranking the items whose ``labels`` are True above the others (ties
    count half: the average-rank statistic); None unless both labels occur."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None


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
    total); by generation ``vqa_parsed`` (the share of answers naming an option, with total); when counted,
    ``vqa_pair_acc`` (correct/total: the pairs) and ``vqa_auroc``. ``suffix`` ends every metric's name
    (``_subset``: the counts of the set's subset)."""
    total = counts["total"]
    base = {"session": session, "dataset": dataset, "total": total, "scoring": scoring}
    rows = [{**base, "metric": "vqa_acc", "value": counts["correct"] / total, "correct": counts["correct"]}]
    if scoring == "letter":
        rows += [{**base, "metric": "vqa_acc_strict", "value": counts["strict_correct"] / total,
                  "correct": counts["strict_correct"]},
                 {**base, "metric": "vqa_letter_mass", "value": counts["letter_mass"] / total}]
    else:
        rows.append({**base, "metric": "vqa_parsed", "value": counts["parsed"] / total})
    if "pairs" in counts:
        rows.append({**base, "metric": "vqa_pair_acc", "value": counts["pairs_correct"] / counts["pairs"],
                     "correct": counts["pairs_correct"], "total": counts["pairs"]})
    if "auroc" in counts:
        rows.append({**base, "metric": "vqa_auroc", "value": counts["auroc"]})
    return [{**row, "metric": row["metric"] + suffix} for row in rows]
