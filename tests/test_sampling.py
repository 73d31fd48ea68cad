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
