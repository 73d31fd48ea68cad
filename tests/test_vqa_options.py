"""Scoring questions with their own answers: the released parse rules on crafted answers, the option scoring that
needs no parse (batched = unbatched, on a tiny random LLaVA and PaliGemma; lettered sets as before), and the per-set
metrics beside accuracy (pair accuracy, AUROC), also over two gloo ranks."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from benchmark.vlm.llava import save_tiny_llava
from benchmark.vlm.paligemma import save_tiny_paligemma
from benchmark.vlm.spec import VLMError, resolve_vlm
from benchmark.vqa.evaluate import VQASet, auroc, pair_counts, score_set, vqa_rows
from benchmark.vqa.questions import LETTERS, MultipleChoiceSet, QuestionItem, QuestionSetError
from benchmark.vqa.scorer import Options, option_scores

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

KINDS = {"letters": ("A", "B", "C"), "shared first token": ("(a)", "(b)"), "first token differs": ("true", "false"),
         "one starts the other": ("no", "no way")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {"llava": save_tiny_llava(root / "llava"), "paligemma": save_tiny_paligemma(root / "paligemma")}


@pytest.fixture(scope="module", params=["llava", "paligemma"])
def vlm(request, folders):
    return resolve_vlm(f"{request.param}:{folders[request.param]}").load("cpu")


@pytest.fixture(scope="module")
def llava(folders):
    return resolve_vlm(f"llava:{folders['llava']}").load("cpu")


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A random RGB image of ``size`` (width, height)."""
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.numpy())


def own(name: str, rule: str, choices: tuple[str, ...], answers: list[int], **kw) -> MultipleChoiceSet:
    """A set with its own prompts: item ``i`` asks ``Question i???...`` with ``choices``, right answer ``answers[i]``."""
    items = tuple(QuestionItem(str(i), f"Question {i}{'?' * 5 * i}", choices, a, kw.pop(f"group{i}", None))
                  for i, a in enumerate(answers))
    return MultipleChoiceSet(name, items, rule, {}, "own", **kw)


# --------------------------------------------------------------------------- the released parse rules
def test_the_released_parse_rules_on_crafted_answers():
    vsr = own("vsr", "vsr", ("false", "true"), [0, 1])
    false, true = vsr.items
    assert vsr.judge("true or false", true) == vsr.judge("true or false", false) == (True, True)  # substring rule
    assert vsr.judge("The statement is FALSE.", false) == (True, True)
    assert vsr.judge("The statement is FALSE.", true) == (False, True)
    assert vsr.judge("It is.", true) == (False, False)

    hm = own("hm", "hm", ("no", "yes"), [1, 0])
    hateful, benign = hm.items
    assert hm.judge("Yes.", hateful) == hm.judge(" YES ", hateful) == (True, True)
    assert hm.judge("yes, it is", hateful) == (False, False)  # exactly yes/no after lower/strip/periods
    assert hm.judge("no.", hateful) == (False, True) and hm.judge("No", benign) == (True, True)

    mmvp = own("mmvp", "mmvp", ("(a)", "(b)"), [0, 1])
    a, b = mmvp.items
    assert mmvp.judge("(a) Snow", a) == (False, True) and mmvp.judge("(a) Snow", b) == (True, True)  # "no" first
    assert mmvp.judge("Yes", a) == (True, True)
    assert mmvp.judge("b", b) == mmvp.judge("(b) Open", b) == (True, True)
    assert mmvp.judge("Open", a) == (False, False)

    visonly = MultipleChoiceSet("visonlyqa", (QuestionItem("0", "How long?", ("3", "4", "5"), 1),), "upper-letter")
    (item,) = visonly.items
    assert visonly.judge("b", item) == visonly.judge(" B ", item) == (True, True)
    assert visonly.judge("B.", item) == (False, False) and visonly.judge("a", item) == (False, True)


# --------------------------------------------------------------------------- pair accuracy and AUROC
def test_pair_counts_against_hand_counted_pairs():
    groups = ["p0", "p0", "p1", "p1", "p2", "p2", None]
    right = [1, 1, 1, 0, 0, 0, 1]
    assert pair_counts(groups, range(7), right) == {"pairs_correct": 1, "pairs": 3}  # only p0 has both right
    # a subset: only the groups asked whole count (p0), a lone item counts for none
    assert pair_counts(groups, [0, 1, 2, 4, 6], [1, 1, 1, 0, 1]) == {"pairs_correct": 1, "pairs": 1}
    assert pair_counts(groups, [2, 6], [1, 1]) == {}
    assert pair_counts([None, None], range(2), [1, 0]) == {}


def test_auroc_against_hand_computed_values_with_ties():
    # positives score 0.9, 0.4, 0.7; negatives 0.4, 0.2: of the 6 (positive, negative) pairs 5 are ordered right
    # and one (0.4, 0.4) is tied, counting half: 5.5 / 6
    assert auroc([True, False, True, False, True], [0.9, 0.4, 0.4, 0.2, 0.7]) == pytest.approx(11 / 12, abs=1e-12)
    assert auroc([True, False], [0.5, 0.5]) == pytest.approx(0.5, abs=1e-12)
    assert auroc([False, True, True], [0.8, 0.1, 0.3]) == pytest.approx(0.0, abs=1e-12)
    assert auroc([True, True], [0.1, 0.9]) is None  # one class: undefined


# --------------------------------------------------------------------------- option scoring
def mixed_items(vlm, n: int = 6):
    """``n`` questions of different prompt lengths and image shapes, cycling through :data:`KINDS`' answers."""
    kinds = list(KINDS.values())
    return [(image(i, (40 + 7 * i, 30)), vlm.prompt(f"Question {i}{'?' * 6 * i}"), kinds[i % len(kinds)])
            for i in range(n)]


def test_each_kind_of_options_takes_its_path(vlm):
    paths = {kind: Options.of(answers, vlm.answer_tokens(answers)) for kind, answers in KINDS.items()}
    assert paths["letters"].prefix == () and len(set(paths["letters"].deciding)) == 3
    assert len(paths["shared first token"].prefix) == 1 and paths["shared first token"].deciding is not None
    assert paths["first token differs"].prefix == () and paths["first token differs"].deciding is not None
    assert paths["one starts the other"].deciding is None
    assert paths["one starts the other"].disjoint() == [0]  # "no way" already starts with "no"


def test_batched_option_scores_equal_unbatched(vlm):
    items = mixed_items(vlm)
    batched = option_scores(vlm, items)
    for item, score in zip(items, batched):
        (alone,) = option_scores(vlm, [item])
        torch.testing.assert_close(torch.tensor(score.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-5)
        assert (score.choice, score.top_token, score.top_option) == (alone.choice, alone.top_token, alone.top_option)
        assert score.mass == pytest.approx(alone.mass, rel=1e-4)
    assert [s.top_token is None for s in batched] == [False, False, False, True, False, False]
    assert all(sum(s.probs) == pytest.approx(1.0, abs=1e-9) for s in batched)


def test_an_option_s_score_is_the_log_likelihood_of_its_tokens(llava):
    """Checked against the prompt with the answer's start written into it (the character tokenizer reads
    ``ASSISTANT: n`` as ``ASSISTANT:`` + `` n``): the deciding path's ``(a)``/``(b)`` through ``▁(``, the summed path's
    ``no`` / ``no way`` through all their tokens."""
    picture, prompt = image(3, (50, 30)), llava.prompt("Is it?")
    for answers in (("(a)", "(b)"), ("no", "no way")):
        (score,) = option_scores(llava, [(picture, prompt, answers)])
        options = Options.of(answers, llava.answer_tokens(answers))
        for tokens, logprob in zip(options.tokens, score.logprobs):
            upto = len(options.prefix) + 1 if options.deciding is not None else len(tokens)
            expected = 0.0
            for j in range(upto):
                batch = llava.inputs([picture], [prompt + llava.processor.tokenizer.decode(tokens[:j])])
                assert batch["input_ids"][0, batch["input_ids"].shape[1] - j:].tolist() == list(tokens[:j])
                with torch.no_grad():
                    expected += float(llava.answer_logits(batch).log_softmax(-1)[0, tokens[j]])
            assert logprob == pytest.approx(expected, abs=1e-4)


def test_paligemma_reads_the_continuation_as_its_suffix(folders):
    """The summed path against PaliGemma's own forward of the prompt with ``no way`` as the processor's suffix
    (token type 1: read causally)."""
    vlm = resolve_vlm(f"paligemma:{folders['paligemma']}").load("cpu")
    picture, prompt = image(4, (40, 24)), vlm.prompt("Is it?")
    (score,) = option_scores(vlm, [(picture, prompt, ("no", "no way"))])
    made = vlm.processor(images=[picture], text=[prompt], suffix=["no way"], return_tensors="pt")
    made.pop("labels")
    with torch.no_grad():
        logprobs = vlm.model(**made, position_ids=made["attention_mask"].cumsum(-1)).logits.float().log_softmax(-1)[0]
    tokens = vlm.answer_tokens(["no way"])[0]
    start = len(made["input_ids"][0]) - len(tokens) - 1  # then <eos>
    assert made["input_ids"][0, start:-1].tolist() == tokens and made["token_type_ids"][0, start:].eq(1).all()
    expected = sum(float(logprobs[start - 1 + j, t]) for j, t in enumerate(tokens))
    assert score.logprobs[1] == pytest.approx(expected, abs=1e-4)


# main's letter_scores on the tiny LLaVA (save_tiny_llava, seed 0) for the questions of lettered_items, before the
# option scoring: (choice, top token, letter log-probabilities)
MAIN_LETTER_SCORES = [
    (0, 128, (-5.145864, -5.448251)),
    (4, 128, (-5.14246, -5.456391, -5.34866, -5.31204, -5.104909)),
    (0, 128, (-5.141736, -5.462287, -5.351649)),
    (0, 128, (-5.140427, -5.469315, -5.353159, -5.31534)),
]


def lettered_items(vlm):
    questions = MultipleChoiceSet("test", tuple(
        QuestionItem(str(i), f"Question {i}{'?' * 9 * i}", tuple(f"option {j}" for j in range(k)), 0)
        for i, k in enumerate((2, 5, 3, 4))))
    return [(image(i, (40 + 7 * i, 30)), vlm.prompt(questions.prompt(item)), questions.answers(item))
            for i, item in enumerate(questions.items)]


def test_lettered_sets_score_as_before(llava):
    items = lettered_items(llava)
    scores = option_scores(llava, items)
    for score, (choice, top, logprobs) in zip(scores, MAIN_LETTER_SCORES):
        assert (score.choice, score.top_token, score.top_option) == (choice, top, None)
        torch.testing.assert_close(torch.tensor(score.logprobs), torch.tensor(logprobs), rtol=0, atol=1e-5)
    # and exactly the first-answer-token path: one forward, the letters' log-probabilities over the vocabulary
    letters = llava.letter_token_ids(LETTERS)
    with torch.no_grad():
        rows = llava.answer_logits(llava.inputs([i for i, _, _ in items], [p for _, p, _ in items])).log_softmax(-1)
    for score, row, (_, _, answers) in zip(scores, rows, items):
        assert score.logprobs == tuple(row[letters[:len(answers)]].tolist())
        assert score.mass == float(torch.tensor(score.logprobs).exp().sum())


def test_options_that_cannot_be_told_apart_are_refused(llava):
    with pytest.raises(VLMError, match=r"the answers \['yes', 'yes'\] give the same tokens twice"):
        option_scores(llava, [(image(0, (32, 32)), llava.prompt("?"), ("yes", "yes"))])
    with pytest.raises(VLMError, match="cannot read the answer 'ja\u0308' after 'ASSISTANT:'"):
        llava.answer_tokens(["ja\u0308"])  # a character the tokenizer does not know


# --------------------------------------------------------------------------- score_set's metrics
def metric_sets() -> list[VQASet]:
    """A pair-grouped MMVP-like set and a Hateful-Memes-like set with ``yes`` as the positive answer."""
    pictures = [(image(10 + i, (36 + 4 * i, 30)), 0) for i in range(7)]
    groups = {f"group{i}": f"pair{i // 2}" for i in range(6)}
    mmvp = own("mmvp", "mmvp", ("(a)", "(b)"), [0, 1, 1, 0, 0, 1, 0], **groups)
    hm = own("hm", "hm", ("no", "yes"), [1, 0, 1, 1, 0, 0, 1], positive="yes")
    return [VQASet("mmvp", mmvp, pictures), VQASet("hm", hm, pictures)]


def rank_auroc(labels: list[bool], scores: list[float]) -> float:
    """Mann-Whitney: the share of (positive, negative) pairs ordered right, ties half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_score_set_counts_pairs_and_auroc_of_own_question_sets(llava):
    mmvp, hm = metric_sets()
    counts = score_set(llava, mmvp, batch_size=3)
    scores = option_scores(llava, [(p, llava.prompt(mmvp.questions.prompt(item)), ("(a)", "(b)"))
                                   for (p, _), item in zip(mmvp.images, mmvp.questions.items)])
    right = [s.choice == item.answer for s, item in zip(scores, mmvp.questions.items)]
    pairs = sum(right[i] and right[i + 1] for i in (0, 2, 4))
    assert counts["correct"] == sum(right) and (counts["pairs"], counts["pairs_correct"]) == (3, pairs)
    assert "auroc" not in counts
    rows = vqa_rows(1, "mmvp", counts, "letter")
    assert rows[-1] == {"session": 1, "dataset": "mmvp", "total": 3, "scoring": "letter", "metric": "vqa_pair_acc",
                        "value": pairs / 3, "correct": pairs}

    counts = score_set(llava, hm, batch_size=2)
    scores = option_scores(llava, [(p, llava.prompt(hm.questions.prompt(item)), ("no", "yes"))
                                   for (p, _), item in zip(hm.images, hm.questions.items)])
    labels = [item.answer == 1 for item in hm.questions.items]
    assert counts["auroc"] == pytest.approx(rank_auroc(labels, [s.probs[1] for s in scores]), abs=1e-12)
    assert "pairs" not in counts and vqa_rows(1, "hm", counts, "letter")[-1]["metric"] == "vqa_auroc"
    assert "auroc" not in score_set(llava, hm, batch_size=4, scoring="generate")  # P(yes) needs letter scoring

    broken = VQASet("hm", own("hm", "hm", ("no", "yes"), [1, 0], positive="Yes"), hm.images)
    with pytest.raises(QuestionSetError, match=r"item '0' has the answers \['no', 'yes'\], without the set's "
                                               r"positive answer 'Yes'"):
        score_set(llava, broken, batch_size=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_counts(rank: int, world: int, port: int, folder: str, out) -> None:
    """One gloo rank: score_set of :func:`metric_sets` with its share of the questions."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    vlm = resolve_vlm(f"llava:{folder}").load("cpu")
    out.put((rank, [score_set(vlm, qset, batch_size=2) for qset in metric_sets()]))
    torch.distributed.destroy_process_group()


def test_two_ranks_count_the_pairs_and_auroc_of_the_whole_set(llava, folders):
    """Each rank scores every other question (so each pair is split over the ranks); the counts are the same."""
    alone = [score_set(llava, qset, batch_size=2) for qset in metric_sets()]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_counts, args=(2, _free_port(), str(folders["llava"]), queue), nprocs=2, join=True)
    ranks = dict(queue.get() for _ in range(2))
    for rank in (0, 1):
        for ours, single in zip(ranks[rank], alone):
            assert ours.keys() == single.keys()
            assert {k: v for k, v in ours.items() if k not in ("letter_mass", "auroc")} == \
                {k: v for k, v in single.items() if k not in ("letter_mass", "auroc")}
            assert ours["letter_mass"] == pytest.approx(single["letter_mass"], rel=1e-4)
            assert ours.get("auroc", 0) == pytest.approx(single.get("auroc", 0), abs=1e-9)
