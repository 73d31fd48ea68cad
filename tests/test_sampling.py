"""Few-shot sampling: deterministic, hash-seed independent, class-independent."""
import json
import os
import subprocess
import sys

from streams.digits import Digits
from streams.sampling import FewShotSampler

SCRIPT = """
import json, benchmark
from streams.digits import Digits
print(json.dumps([s.ids for s in Digits('unused').sessions(5, 3, shot_seed=7)]))
"""


def test_same_seed_same_samples_whatever_the_hash_seed():
    outputs = []
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
        outputs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    assert outputs[0] == [s.ids for s in Digits("unused").sessions(5, 3, shot_seed=7)]


def test_k_distinct_images_of_each_class_and_seed_changes_them():
    train = Digits("unused").dataset("train")
    sampler = FewShotSampler("digits", 4, 0)
    session = sampler.sample(train.targets, train.ids, 1, [3, 5])
    by_id = dict(zip(train.ids, train.targets))
    assert len(session.ids) == len(set(session.ids)) == 8
    assert [by_id[i] for i in session.ids] == [3] * 4 + [5] * 4
    other = FewShotSampler("digits", 4, 1).sample(train.targets, train.ids, 1, [3, 5])
    assert other.ids != session.ids


def test_a_class_draw_does_not_depend_on_the_other_classes():
    train = Digits("unused").dataset("train")
    sampler = FewShotSampler("digits", 2, 0)
    alone = sampler.sample(train.targets, train.ids, 2, [7]).ids
    together = sampler.sample(train.targets, train.ids, 2, [1, 7, 9]).ids
    assert together[2:4] == alone


def test_short_class_keeps_everything():
    targets, ids = [0, 0, 1, 1, 1], ["a", "b", "c", "d", "e"]
    session = FewShotSampler("x", 2, 0).sample(targets, ids, 1, [0, 1])
    assert session.short_classes == [0]
    assert session.ids[:2] == ["a", "b"] and len(session.ids) == 4


def test_sessions_follow_the_class_order():
    sessions = Digits("unused").sessions(3, 1, 0)
    assert [s.classes for s in sessions] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_checking_readability_changes_no_draw_and_a_bad_one_is_replaced_within_its_class():
    train = Digits("unused").dataset("train")
    sampler = FewShotSampler("digits", 3, 5)
    plain = sampler.sample(train.targets, train.ids, 1, [2, 6])
    checked = sampler.sample(train.targets, train.ids, 1, [2, 6], unreadable=lambda i: None)
    assert checked == plain and not checked.replaced and not checked.unreadable
    bad = {train.ids.index(plain.ids[1]), train.ids.index(plain.ids[4])}  # one drawn image of each class

    def unreadable(i: int) -> str | None:
        return "broken" if i in bad else None

    first = sampler.sample(train.targets, train.ids, 1, [2, 6], unreadable=unreadable)
    assert first == sampler.sample(train.targets, train.ids, 1, [2, 6], unreadable=unreadable)  # deterministic
    assert set(first.replaced) == {plain.ids[1], plain.ids[4]} and sorted(first.unreadable) == sorted(first.replaced)
    by_id = dict(zip(train.ids, train.targets))
    for old, new in first.replaced.items():
        assert by_id[new] == by_id[old] and new not in plain.ids
    assert set(first.ids) == (set(plain.ids) - set(first.replaced)) | set(first.replaced.values())
    alone = sampler.sample(train.targets, train.ids, 1, [6], unreadable=unreadable)
    assert alone.ids == first.ids[3:]  # still independent of the other classes
