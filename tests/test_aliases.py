"""Model aliases: compare-and-set, the kept history and ``resolve(at=)``, the promotion gate, ``name@alias`` in the
registry, bad input (typed errors, nothing changed), and two processes racing over 1,000 changes."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timezone

import numpy as np
import pytest
from conftest import PYTHON

import mlwarehouse
from mlwarehouse.errors import AliasConflict, DependencyError, InvalidDocument, NotFound, PromotionRefused, QueryError
from mlwarehouse.ids import parse_time
from mlwarehouse.models.aliases import ANY


@pytest.fixture
def lab(wh):
    test = wh.datasets.save(np.arange(4), "march-test")
    a = wh.models.save({"w": np.ones(2)}, "mlp")
    b = wh.models.save({"w": np.zeros(2)}, "mlp")
    other = wh.models.save({"w": np.ones(1)}, "cnn")
    return wh, test, a, b, other


def test_set_resolve_and_history(lab):
    wh, _, a, b, _ = lab
    aliases = wh.models.aliases
    assert aliases.resolve("mlp", "champion") is None and aliases.history("mlp@champion") == []
    first = aliases.set("mlp", "champion", a, by="alice", reason="first")
    time.sleep(0.002)
    second = aliases.set("mlp", "champion", b.id)
    assert (first.version, first.model, first.previous) == (1, a.id, None)
    assert (second.version, second.model, second.previous) == (2, b.id, a.id)
    assert aliases.resolve("mlp@champion") == b.id
    assert aliases.resolve("mlp", "champion", at=first.changed) == a.id
    assert aliases.resolve("mlp", "champion", at=parse_time(first.changed)) == a.id  # a datetime works too
    assert aliases.resolve("mlp", "champion", at="2000-01-01T00:00:00.000000Z") is None
    assert [c.version for c in aliases.history("mlp", "champion")] == [1, 2]
    assert [c.version for c in aliases.history("mlp@champion", limit=1)] == [2]
    assert aliases.list() == {"mlp@champion": b.id} and aliases.of(b) == ["mlp@champion"] and aliases.of(a) == []
    removed = aliases.remove("mlp", "champion", reason="retired")
    assert removed.model is None and removed.previous == b.id and aliases.resolve("mlp@champion") is None
    assert aliases.resolve("mlp@champion", at=second.changed) == b.id
    assert aliases.list() == {}
    assert [c.version for c in aliases.changes(b)] == [2, 3]


def test_compare_and_set(lab):
    wh, _, a, b, _ = lab
    aliases = wh.models.aliases
    aliases.set("mlp", "staging", a, expected=None)  # create only
    with pytest.raises(AliasConflict) as info:
        aliases.set("mlp", "staging", b, expected=None)
    assert info.value.current == a.id and info.value.version == 1
    with pytest.raises(AliasConflict):
        aliases.set("mlp", "staging", b, expected=b.id)
    assert aliases.resolve("mlp@staging") == a.id and len(aliases.history("mlp@staging")) == 1  # nothing changed
    change = aliases.set("mlp", "staging", b, expected=a)
    assert change.previous == a.id and change.version == 2
    assert aliases.set("mlp", "staging", a, expected=ANY).version == 3


def test_name_at_alias_everywhere_a_model_is_named(lab):
    wh, _, a, b, _ = lab
    wh.models.aliases.set("mlp", "champion", a)
    assert wh.models.get("mlp@champion").id == a.id
    assert wh.models.load("mlp@champion")["w"].tolist() == [1.0, 1.0]
    assert wh.models.load(id="mlp@champion")["w"].tolist() == [1.0, 1.0]
    with pytest.raises(NotFound, match="points at no model"):
        wh.models.get("mlp@staging")
    with pytest.raises(NotFound):
        wh.models.load("mlp@staging")


def test_promotion_gate(lab):
    wh, test, a, b, _ = lab
    ev, aliases = wh.models.evaluations, wh.models.aliases
    ev.record(a, test, "accuracy", 0.80)
    ev.record(b, test, "accuracy", 0.83)
    ev.record(a, test, "loss", 0.5)
    ev.record(b, test, "loss", 0.6)
    assert aliases.promote("mlp", "champion", a, evaluation=(test, "accuracy")).model == a.id  # unset: given
    with pytest.raises(PromotionRefused) as info:
        aliases.promote("mlp", "champion", b, evaluation=(test, "accuracy"), margin=0.05)
    assert (info.value.candidate, info.value.holder, info.value.margin) == (0.83, 0.80, 0.05)
    assert "0.83" in str(info.value) and "0.8" in str(info.value) and "margin 0.05" in str(info.value)
    with pytest.raises(PromotionRefused):  # lower is better: b's loss is worse
        aliases.promote("mlp", "champion", b, evaluation=(test, "loss"), mode="min")
    assert aliases.resolve("mlp@champion") == a.id and len(aliases.history("mlp@champion")) == 1
    change = aliases.promote("mlp", "champion", b, evaluation=(test, "accuracy"), margin=0.02, reason="better")
    assert (change.model, change.previous, change.reason) == (b.id, a.id, "better")
    assert aliases.promote("mlp", "champion", b, evaluation=(test, "accuracy")).version == 2  # holds it: no-op


def test_promotion_refused_when_the_holder_has_no_evaluation(lab):
    wh, test, a, b, _ = lab
    wh.models.aliases.set("mlp", "champion", a)
    wh.models.evaluations.record(b, test, "accuracy", 0.9)
    with pytest.raises(PromotionRefused, match="has no evaluation") as info:
        wh.models.aliases.promote("mlp", "champion", b, evaluation=(test, "accuracy"))
    assert info.value.holder is None and info.value.candidate == 0.9
    assert wh.models.aliases.resolve("mlp@champion") == a.id


def test_bad_input_is_typed_and_changes_nothing(lab):
    wh, test, a, b, other = lab
    aliases = wh.models.aliases
    aliases.set("mlp", "champion", a)
    before = [c.doc for c in aliases.history("mlp@champion")]
    with pytest.raises(NotFound):  # an alias on a missing model
        aliases.set("mlp", "champion", "01ABCDEFGHJKMNPQRSTVWXYZ00")
    with pytest.raises(NotFound, match="no evaluation of any model has the metric 'f1'"):  # a gate metric no
        aliases.promote("mlp", "champion", b, evaluation=(test, "f1"))              # evaluation has
    wh.models.evaluations.record(a, test, "accuracy", 0.5)
    with pytest.raises(NotFound, match="has no evaluation"):  # the candidate's evaluation is missing
        aliases.promote("mlp", "champion", b, evaluation=(test, "accuracy"))
    with pytest.raises(QueryError, match="named 'cnn'"):  # an alias of mlp points at a model named mlp
        aliases.set("mlp", "champion", other)
    for bad in ("", "-x", "a b", "x" * 65, 3):
        with pytest.raises(QueryError):
            aliases.set("mlp", bad, b)
    with pytest.raises(QueryError):
        aliases.promote("mlp", "champion", b, evaluation=(test, "accuracy"), mode="best")
    with pytest.raises(QueryError):
        aliases.promote("mlp", "champion", b, evaluation=(test, "accuracy"), margin=-1)
    with pytest.raises(QueryError):
        aliases.promote("mlp", "champion", b, evaluation="accuracy")
    with pytest.raises(QueryError):
        aliases.resolve("mlp@champion", at="yesterday")
    with pytest.raises(QueryError):
        aliases.set("mlp", "champion", b, expected=3.5)
    with pytest.raises(InvalidDocument):
        aliases.set("mlp", "champion", b, reason=["not", "text"])
    with pytest.raises(NotFound):
        aliases.remove("mlp", "staging")
    assert [c.doc for c in aliases.history("mlp@champion")] == before


def test_a_model_an_alias_points_at_is_not_deleted_unless_forced(wh):
    a, b = wh.models.save({"w": np.ones(2)}, "mlp"), wh.models.save({"w": np.zeros(2)}, "mlp")
    wh.models.aliases.set("mlp", "champion", a)
    with pytest.raises(DependencyError, match="mlp@champion"):
        wh.models.delete(where={"_id": a.id})
    assert wh.models.get(a.id)
    wh.models.aliases.set("mlp", "champion", b)
    assert wh.models.delete(where={"_id": a.id}) == 1
    assert wh.models.delete("mlp", force=True) == 1
    assert wh.models.aliases.history("mlp", "champion")[-1].model == b.id  # the history outlives the model


def test_times_never_go_back_within_an_alias(lab):
    wh, _, a, b, _ = lab
    changes = [wh.models.aliases.set("mlp", "fast", (a, b)[i % 2]) for i in range(30)]
    stamps = [c.changed for c in changes]
    assert stamps == sorted(stamps) and [c.version for c in changes] == list(range(1, 31))
    for change in changes:  # equal stamps resolve to the highest version among them
        last = max(c.version for c in changes if c.changed <= change.changed)
        assert wh.models.aliases.resolve("mlp@fast", at=change.changed) == changes[last - 1].model


RACER = """
import json, random, sys, mlwarehouse
from mlwarehouse.errors import AliasConflict
from mlwarehouse.models.aliases import ANY
seed, count, ids = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
rng = random.Random(seed)
wh = mlwarehouse.connect(project="race")
aliases = wh.models.aliases
won, lost = [], 0
for _ in range(count):
    head = aliases.head("mlp", "champion")
    holder = None if head is None else head.model
    roll = rng.random()
    try:
        if roll < 0.1 and holder is not None:
            change = aliases.remove("mlp", "champion", expected=holder)
        elif roll < 0.3:
            change = aliases.set("mlp", "champion", rng.choice(ids))  # whoever holds it
        else:
            change = aliases.set("mlp", "champion", rng.choice(ids), expected=holder)
        won.append([change.version, change.model, change.previous])
    except AliasConflict:
        lost += 1
wh.close()
print(json.dumps({"won": won, "lost": lost}))
"""


@pytest.mark.slow
def test_two_promoters_racing_over_1000_changes(tmp_path, subprocess_env):
    with mlwarehouse.connect(home=tmp_path / "wh", project="race") as wh:
        ids = [wh.models.save({"w": np.full(1, float(i))}, "mlp").id for i in range(4)]
        wh.models.aliases.set("mlp", "champion", ids[0])
    procs = [subprocess.Popen([PYTHON, "-c", RACER, str(seed), "500", ",".join(ids)], env=subprocess_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    with mlwarehouse.connect(home=tmp_path / "wh", project="race") as wh:
        aliases = wh.models.aliases
        history = aliases.history("mlp", "champion")
        won = [tuple(w) for r in results for w in r["won"]]
        # no update lost, none won twice: one version per successful change, 1 (the set up) .. N
        assert len(history) == 1 + len(won) and sum(r["lost"] for r in results) + len(won) == 1000
        assert [c.version for c in history] == list(range(1, len(history) + 1))
        assert sorted(won) == sorted((c.version, c.model, c.previous) for c in history[1:])
        for before, after in zip(history, history[1:]):  # each change replaced the holder before it
            assert after.previous == before.model and after.changed >= before.changed
        # resolve(at=t) is the holder the history implies at every change time and between them
        stamps = sorted({c.changed for c in history})
        probes = list(stamps)
        for left, right in zip(stamps, stamps[1:]):
            middle = (parse_time(left).timestamp() + parse_time(right).timestamp()) / 2
            probes.append(datetime.fromtimestamp(middle, timezone.utc))
        first, last = parse_time(stamps[0]).timestamp(), parse_time(stamps[-1]).timestamp()
        probes += [datetime.fromtimestamp(first - 1, timezone.utc), datetime.fromtimestamp(last + 1, timezone.utc)]
        for t in probes:  # before the first change: no holder; after the last: its model
            key = t if isinstance(t, str) else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            implied = [c for c in history if c.changed <= key]
            assert aliases.resolve("mlp", "champion", at=t) == (implied[-1].model if implied else None), t
        assert aliases.resolve("mlp", "champion", at=probes[-2]) is None
        assert aliases.resolve("mlp", "champion", at=probes[-1]) == history[-1].model
        assert aliases.resolve("mlp@champion") == history[-1].model
        assert min(len(r["won"]) for r in results) > 0  # both processes won some
