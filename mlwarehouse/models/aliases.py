"""Model aliases with their whole history: ``champion``, ``staging`` or any name pointing at a model of one name.

An alias belongs to a model name (``mlp@champion``: the alias ``champion`` of the models named ``mlp``), so each
family of models has its own champion; it is used wherever a model is named (``wh.models.load("mlp@champion")``,
``wh.models.get``, ``mlw show mlp@champion``, the web UI's model pages).

Storage (collection :data:`mlwarehouse.schema.ALIASES`) is append-only: one document per change of (name, alias)
with its ``version`` (1, 2, 3...), the ``model`` it points at from then on (None: removed), the ``previous`` holder
it replaced, ``changed`` (the time it took effect), and who and why. The holder is the change of highest version.

Compare-and-set: a change is the insert of version ``v + 1`` after reading version ``v``, and the unique index on
(project, name, alias, version) lets exactly one writer insert each version (on every backend), so two racing
promoters can neither both win nor lose an update: the loser gets DuplicateKey, reads the new holder and either
tries again (``expected=ANY``) or raises :class:`~mlwarehouse.errors.AliasConflict` (an ``expected`` holder that
is no longer the holder). There is no second document to keep in step, so a writer killed mid-change leaves
either the whole change or nothing.

Time: ``changed`` is ``max(now, the previous change's changed)``, computed after reading the previous version, so
times never decrease with the version even across processes whose clocks disagree a little. ``resolve(at=t)``
answers with the change of highest version whose ``changed <= t``: exact for every ``t``, and the same answer
every time once the changes up to ``t`` are written. (A writer whose clock lags can still make a change appear
at a time before a read that did not see it; times are as good as the writers' clocks, versions are exact.)

Setting an alias always records a change, even to the model that holds it (the history says "set again at t");
:meth:`Aliases.promote` alone does nothing when the candidate already holds the alias.

Promotion gate (as TFX blesses a model only if it beats the serving baseline): :meth:`Aliases.promote` moves the
alias only if the candidate's evaluation (``(data, metric)``, see :mod:`mlwarehouse.models.evaluations`) beats the
holder's by at least ``margin`` (``candidate - holder >= margin`` for ``mode="max"``, ``holder - candidate >=
margin`` for ``"min"``); otherwise :class:`~mlwarehouse.errors.PromotionRefused` with both values. The holder
compared is the holder replaced (a promotion that loses a race re-checks against the new holder). A candidate
without that evaluation is NotFound; a holder without it is refused (nothing proves the candidate is better).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from mlwarehouse import schema
from mlwarehouse.errors import AliasConflict, DuplicateKey, InvalidDocument, NotFound, PromotionRefused, QueryError
from mlwarehouse.ids import parse_time, utc_now
from mlwarehouse.models.evaluations import RegistryBook, check_mode
from mlwarehouse.query.records import Record, check_name

__all__ = ["Aliases", "AliasChange", "ANY", "split_alias", "ALIAS_RE"]

COLLECTION = schema.ALIASES.name
#: an alias: letters, digits, ``_ . -``, at most 64 characters
ALIAS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}\Z")
_ATTEMPTS = 1000
_TEXT_MAX = 1000


class _Any:
    def __repr__(self) -> str:
        return "ANY"


#: ``expected=ANY``: change the alias whoever holds it (still never losing a racing change)
ANY: Any = _Any()


class AliasChange(Record):
    """One change of an alias: ``name``, ``alias``, ``version``, ``model`` (None: removed), ``previous``,
    ``changed`` (when it took effect), ``by`` and ``reason``."""

    __slots__ = ()


def split_alias(spelling: Any) -> tuple[str, str] | None:
    """``("mlp", "champion")`` for ``"mlp@champion"``; None for anything that is not such a spelling."""
    if not isinstance(spelling, str) or "@" not in spelling:
        return None
    name, _, alias = spelling.rpartition("@")
    if not name or not ALIAS_RE.match(alias):
        return None
    return name, alias


def _check_alias(alias: Any) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise QueryError(f"an alias is 1 to 64 letters, digits, '_', '.' or '-' (not starting with '.' or '-'), "
                         f"not {alias!r}")
    return alias


def _text(label: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > _TEXT_MAX):
        raise InvalidDocument(f"{label} must be a string of at most {_TEXT_MAX} characters, not {value!r}")
    return value


def as_time(at: Any) -> str:
    """A time stamp as the warehouse writes them, from one (validated) or from a datetime (naive: UTC)."""
    if isinstance(at, datetime):
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)
        return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(at, str):
        try:
            parse_time(at)
        except ValueError:
            raise QueryError(f"at= is a datetime or a time stamp like 2026-01-31T12:00:00.000000Z, not {at!r}") \
                from None
        return at
    raise QueryError(f"at= is a datetime or a time stamp string, not {type(at).__name__}")


class Aliases(RegistryBook):
    """The aliases of one project's models (``wh.models.aliases``)."""

    collection = schema.ALIASES

    def _names(self, name: str, alias: str | None) -> tuple[str, str]:
        if alias is None:
            parts = split_alias(name)
            if parts is None:
                raise QueryError(f"give a model name and an alias, or 'name@alias', not {name!r}")
            return parts
        return check_name("model", name), _check_alias(alias)

    def _model(self, name: str, model: Any) -> str:
        """The id of ``model`` (a record, an id or ``name@alias``), which must exist and be named ``name``."""
        ident = model if isinstance(model, str) else getattr(model, "id", None)
        if not isinstance(ident, str):
            raise QueryError(f"a model is a record, an id or 'name@alias', not {type(model).__name__}")
        record = self.models.get(ident)
        if record.doc.get("name") != name:
            raise QueryError(f"model {record.id!r} is named {record.doc.get('name')!r}, not {name!r}: an alias of "
                             f"{name!r} points at a model of that name")
        return record.id

    # -- reading -------------------------------------------------------------------------------------------
    def head(self, name: str, alias: str | None = None) -> AliasChange | None:
        """The latest change of the alias (its holder: ``.model``), or None if it was never set."""
        name, alias = self._names(name, alias)
        doc = self.project.find_one(COLLECTION, {"name": name, "alias": alias}, sort=[("version", -1)])
        return None if doc is None else AliasChange(doc)

    def resolve(self, name: str, alias: str | None = None, *, at: Any = None) -> str | None:
        """The id of the model that holds ``name@alias`` now, or held it at time ``at`` (a datetime or a time
        stamp); None if it was unset then. ``resolve("mlp@champion")`` works too."""
        name, alias = self._names(name, alias)
        flt: dict = {"name": name, "alias": alias}
        if at is not None:
            flt["changed"] = {"$lte": as_time(at)}
        doc = self.project.find_one(COLLECTION, flt, sort=[("version", -1)], projection={"model": 1})
        return None if doc is None else doc.get("model")

    def get(self, spelling: str, *, at: Any = None):
        """The model record ``mlp@champion`` names (now, or at ``at``); NotFound if the alias is unset."""
        parts = split_alias(spelling)
        if parts is None:
            raise QueryError(f"{spelling!r} is not a 'name@alias' spelling")
        ident = self.resolve(*parts, at=at)
        if ident is None:
            when = "" if at is None else f" at {as_time(at)}"
            raise NotFound(f"alias {spelling!r} points at no model{when} in project {self.project.name!r}")
        return self.models.get(ident)

    def history(self, name: str, alias: str | None = None, *, limit: int | None = None) -> list[AliasChange]:
        """Every change of the alias (the newest ``limit`` if given), oldest first."""
        name, alias = self._names(name, alias)
        docs = self.project.find(COLLECTION, {"name": name, "alias": alias},
                                 sort=[("version", 1 if limit is None else -1)], limit=limit)
        return [AliasChange(d) for d in (docs if limit is None else reversed(docs))]

    def list(self, name: str | None = None) -> dict[str, str]:
        """``{"mlp@champion": model id, ...}``: every alias set now (of the models named ``name``)."""
        flt = {} if name is None else {"name": check_name("model", name)}
        out: dict[str, str] = {}
        for doc in self.project.find(COLLECTION, flt, sort=[("name", 1), ("alias", 1), ("version", -1)],
                                     projection={"name": 1, "alias": 1, "model": 1}):
            key = f"{doc['name']}@{doc['alias']}"
            out.setdefault(key, doc.get("model"))
        return {k: v for k, v in out.items() if v is not None}

    def of(self, model: Any) -> list[str]:
        """The aliases that point at ``model`` now (``["mlp@champion"]``)."""
        ident = model if isinstance(model, str) else getattr(model, "id", None)
        pairs = {(d["name"], d["alias"]) for d in self.project.find(COLLECTION, {"model": ident},
                                                                   projection={"name": 1, "alias": 1})}
        return sorted(f"{n}@{a}" for n, a in pairs if self.resolve(n, a) == ident)

    def changes(self, model: Any) -> list[AliasChange]:
        """Every change that gave an alias to ``model`` or took one from it, oldest first."""
        ident = model if isinstance(model, str) else getattr(model, "id", None)
        docs = self.project.find(COLLECTION, {"$or": [{"model": ident}, {"previous": ident}]},
                                 sort=[("changed", 1), ("version", 1)])
        return [AliasChange(d) for d in docs]

    # -- writing -------------------------------------------------------------------------------------------
    def set(self, name: str, alias: str, model: Any, *, expected: Any = ANY, by: str | None = None,
            reason: str | None = None) -> AliasChange:
        """Point ``name@alias`` at ``model`` (a record or id of a model named ``name``) and return the change.

        ``expected``: the model id (or record) that must hold the alias now, None for "must be unset", ANY (the
        default) for whoever holds it. A holder that is not the expected one raises AliasConflict and changes
        nothing; with ANY, a change that loses a race is retried on the new holder (and records it as
        ``previous``). NotFound for a model that does not exist."""
        name, alias = self._names(name, alias)
        target = self._model(name, model)
        return self._change(name, alias, target, _expected(expected), by, reason)

    def remove(self, name: str, alias: str, *, expected: Any = ANY, by: str | None = None,
               reason: str | None = None) -> AliasChange:
        """Unset ``name@alias`` (a change to None, kept in the history); NotFound if it is not set (AliasConflict
        when an ``expected`` holder was given and the alias is unset, removed by a racing writer)."""
        name, alias = self._names(name, alias)
        return self._change(name, alias, None, _expected(expected), by, reason)

    def promote(self, name: str, alias: str, candidate: Any, *, evaluation: tuple, margin: float = 0.0,
                mode: str = "max", fold: Any = None, by: str | None = None,
                reason: str | None = None) -> AliasChange:
        """Point ``name@alias`` at ``candidate`` only if it beats the holder on ``evaluation`` (``(data,
        metric)``) by at least ``margin``; PromotionRefused (naming both values and the margin) otherwise.

        An unset alias is given to the candidate; a candidate that holds it already returns the latest change.
        NotFound for a candidate with no such evaluation (nothing changed)."""
        name, alias = self._names(name, alias)
        check_mode(mode)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
            raise QueryError(f"margin must be a number >= 0, not {margin!r}")
        if not isinstance(evaluation, (tuple, list)) or len(evaluation) != 2:
            raise QueryError(f"evaluation is (data, metric), not {evaluation!r}")
        data, metric = evaluation
        target = self._model(name, candidate)
        evaluations = self.models.evaluations
        value = evaluations.get(target, data, metric, fold=fold).value
        for _ in range(_ATTEMPTS):
            head = self.head(name, alias)
            holder = None if head is None else head.doc.get("model")
            if holder == target:
                return head
            if holder is not None:
                try:
                    held = evaluations.get(holder, data, metric, fold=fold).value
                except NotFound:
                    raise PromotionRefused(
                        f"not promoting {target} to {name}@{alias}: its holder {holder} has no evaluation by "
                        f"{metric!r} on this data to beat (candidate {value!r}); evaluate it, or set the alias",
                        candidate=value, holder=None, margin=margin) from None
                gain = value - held if mode == "max" else held - value
                if not gain >= margin:
                    better = "higher" if mode == "max" else "lower"
                    raise PromotionRefused(
                        f"not promoting {target} to {name}@{alias}: {metric} {value!r} against the holder "
                        f"{holder}'s {held!r} ({better} is better) is a gain of {gain!r}, below the margin "
                        f"{margin!r}", candidate=value, holder=held, margin=margin)
            change = self._try(name, alias, head, target, by, reason)
            if change is not None:
                return change
        raise AliasConflict(f"{name}@{alias} kept changing: gave up after {_ATTEMPTS} attempts")

    def _change(self, name: str, alias: str, target: str | None, expected: Any, by, reason) -> AliasChange:
        for _ in range(_ATTEMPTS):
            head = self.head(name, alias)
            holder = None if head is None else head.doc.get("model")
            if expected is not ANY and holder != expected:
                raise AliasConflict(f"{name}@{alias} is held by {holder or 'no model'}, not by "
                                    f"{expected or 'no model'} as expected; nothing changed",
                                    current=holder, version=0 if head is None else head.doc["version"])
            if target is None and holder is None:
                raise NotFound(f"alias {name}@{alias} is not set in project {self.project.name!r}")
            change = self._try(name, alias, head, target, by, reason)
            if change is not None:
                return change
        raise AliasConflict(f"{name}@{alias} kept changing: gave up after {_ATTEMPTS} attempts")

    def _try(self, name: str, alias: str, head: AliasChange | None, target: str | None, by,
             reason) -> AliasChange | None:
        """Insert the version after ``head``; None if another writer inserted it first."""
        self._ensure()
        now = utc_now()
        if head is not None and head.doc.get("changed", "") > now:
            now = head.doc["changed"]  # never before the change it follows
        doc = {"name": name, "alias": alias, "version": 1 if head is None else head.doc["version"] + 1,
               "model": target, "previous": None if head is None else head.doc.get("model"), "changed": now,
               "by": _text("by", by), "reason": _text("reason", reason)}
        try:
            return AliasChange(self.project.insert(COLLECTION, doc))
        except DuplicateKey:
            return None

    def __repr__(self) -> str:
        return f"<Aliases of {self.project!r}>"


def _expected(expected: Any) -> Any:
    if expected is ANY or expected is None or isinstance(expected, str):
        return expected
    ident = getattr(expected, "id", None)
    if isinstance(ident, str):
        return ident
    raise QueryError(f"expected is a model id or record, None (unset) or ANY, not {type(expected).__name__}")
