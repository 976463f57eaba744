"""The ``.pt2`` check: an exported program's archive is inspected, then torch reads only what was inspected.

``torch.export.load`` runs code when an archive asks it to (see :mod:`mlwarehouse.models.torch_io`). A check that
reads the archive with one zip reader while torch reads it with another is not a check: two entries of one name,
a central directory that disagrees with the local headers, or JSON that two parsers read differently each let
torch load bytes nobody looked at. So :func:`check_pt2` reads every entry once, refuses what would run code, and
returns a *new* archive built from exactly the entries it checked (JSON re-serialized from the parsed tree it
checked, stored uncompressed). The sample inputs are checked with ``torch.load(weights_only=True)`` and then left
out of the new archive (an empty record, which torch reads as "no example inputs"), so torch's fallback to
``weights_only=False`` for them can never run.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from typing import Any

import torch

from mlwarehouse.errors import CodecError, PickleNotAllowed

__all__ = ["check_pt2"]

_PT2_FILES = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/[\w.-]+\.json"
    r"|data/weights/(weight_\d+|[\w.-]+_weights_config\.json)|data/constants/(tensor_\d+|[\w.-]+_constants_config"
    r"\.json)|data/sample_inputs/[\w.-]+\.pt)", re.ASCII)
_ROOT = re.compile(r"[\w.-]+", re.ASCII)
_TARGET = re.compile(r"(torch\.ops\.[A-Za-z]\w*\.(_?[A-Za-z]\w*|__(i?(and|or|xor|lshift|rshift))__)(\.[A-Za-z]\w*)?"
                     r"|math\.[a-z]+[a-z0-9]*|torch\.(sym_[a-z_]+|_sym_sqrt)"
                     r"|_operator\.(getitem|add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|and_|or_|xor|invert"
                     r"|eq|ne|lt|le|gt|ge|not_|lshift|rshift|matmul|truth|index))", re.ASCII)
_EXPR_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?(?:e[+-]?\d+)?)|([A-Za-z_]\w*)|('[a-z]{1,3}\d+')|([-+*/%(),<>=!&|~^]))",
                         re.ASCII)
_EXPR_WORDS = frozenset({"True", "False", "positive", "integer", "nonnegative", "negative", "real", "finite",
                         "oo", "zoo", "nan", "sqrt", "floor", "ceiling", "log", "exp"})
_REFUSE = "this exported program {} (torch.export.load would run code): pass allow_pickle=True to trust it"


def check_pt2(data: bytes | None, *, allow_pickle: bool = False) -> bytes:
    """The archive torch may read: ``data`` itself with ``allow_pickle``, else a checked copy (module docstring).

    PickleNotAllowed for anything that would run code (duplicate entries included), CodecError for what is not a
    well-formed ``.pt2`` archive.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise CodecError("the exported architecture has no archive bytes")
    if allow_pickle:
        return bytes(data)
    entries = _read_entries(data)
    out = io.BytesIO()
    graphs = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, rel, content in entries:
            if rel.endswith(".json"):
                tree = _json(rel, content)
                if rel.startswith("models/"):
                    graphs.append(tree)
                else:
                    _check_payload_config(tree)
                content = _dumps(rel, tree)  # torch parses the very tree that was checked
            elif rel.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(content), weights_only=True)
                except Exception as exc:
                    raise PickleNotAllowed(_REFUSE.format("has sample inputs that need pickle")) from exc
                content = b""  # checked, then left out: torch never unpickles them, with or without fallback
            dst.writestr(name, content)
    if not graphs:
        raise CodecError("the .pt2 archive holds no exported program")
    for graph in graphs:
        for key, value in _strings(graph):
            if key == "target" and not _TARGET.fullmatch(value):
                raise PickleNotAllowed(_REFUSE.format(f"calls {value!r}"))
            if key == "expr_str" and not _safe_expr(value):
                raise PickleNotAllowed(_REFUSE.format(f"has the shape expression {value!r}"))
    return out.getvalue()


def _read_entries(data: bytes) -> list[tuple[str, str, bytes]]:
    """(name, path below the root, bytes) of every entry, each name once, each entry stored as torch writes it."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise CodecError(f"not a .pt2 archive: {exc}") from exc
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise PickleNotAllowed(_REFUSE.format(f"holds the entries {dup} more than once (zip readers disagree on "
                                              "which copy counts)"))
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or not _ROOT.fullmatch(next(iter(roots))):
        raise CodecError(f"a .pt2 archive has one root folder, this one has {sorted(roots)}")
    entries = []
    for info in infos:
        rel = info.filename.split("/", 1)[1] if "/" in info.filename else ""
        if not _PT2_FILES.fullmatch(rel):
            raise PickleNotAllowed(_REFUSE.format(f"holds the file {rel!r}"))
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.file_size > len(data):
            raise CodecError(f"the .pt2 entry {rel!r} is compressed, encrypted or larger than the archive "
                             "(torch stores entries as they are)")
        try:
            entries.append((info.filename, rel, archive.read(info)))
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, ValueError, EOFError, OSError,
                zlib.error) as exc:
            raise CodecError(f"cannot read {rel!r} from the .pt2 archive: {exc}") from exc
    return entries


def _json(rel: str, content: bytes) -> Any:
    try:
        return json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CodecError(f"the .pt2 entry {rel!r} is not valid JSON: {exc}") from exc


def _dumps(rel: str, tree: Any) -> bytes:
    try:
        return json.dumps(tree).encode()
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"the .pt2 entry {rel!r} is too deeply nested: {exc}") from exc


def _check_payload_config(tree: Any) -> None:
    """A weights or constants config may name only raw tensor files, never a pickled payload."""
    config = tree.get("config") if isinstance(tree, dict) else None
    if not isinstance(config, dict):
        raise CodecError("a .pt2 payload config has no 'config' object")
    for fqn, meta in config.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False \
                or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
            raise PickleNotAllowed(_REFUSE.format(f"stores {fqn!r} as a pickled object"))


def _strings(tree: Any):
    """Every (key, string value) pair in a JSON tree."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str):
                    yield k, v
                else:
                    stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)


def _safe_expr(text: str) -> bool:
    """True if a sympy expression string holds only numbers, symbols, operators and sympy function calls."""
    pos = 0
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            return text[pos:].strip() == ""
        word = m.group(2)
        if word is not None and not (word in _EXPR_WORDS or re.fullmatch(r"[a-z]{1,3}\d+", word)
                                     or re.fullmatch(r"[A-Z][A-Za-z0-9]*", word)):
            return False
        pos = m.end()
    return True
