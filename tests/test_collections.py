"""Collections on one backend (SQLite + files): data types (images, audio, users' types by import path, already
encoded values, raw reads) and bad input, each refused with a typed error and nothing half-written. The behaviour
every backend shares is in :mod:`mlwarehouse.testing.collection_conformance` (tests/test_collections_backends.py).
"""

from __future__ import annotations

import io

import numpy as np
import pytest

import mlwarehouse.codecs.imports
from mlwarehouse import schema
from mlwarehouse.collections import Audio, DataTypeError, Encoded, ListenerError
from mlwarehouse.collections.catalog import Catalog
from mlwarehouse.errors import CodecError, DuplicateKey, InvalidDocument, QueryError
from mlwarehouse.testing import collection_conformance as cc
from mlwarehouse.testing import listener_conformance as lc
from mlwarehouse.testing.collection_conformance import Point, decode_point, encode_point

MODULE = cc.__name__


def stored(c, doc_id):
    """The document as the index holds it (packed: codec names, blob references)."""
    return c.table.find_one({"_id": doc_id})


# -- data types ------------------------------------------------------------------------------------------------

def test_images_round_trip_mode_size_and_pixels(wh):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    images = {
        "rgb": Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "RGB"),
        "gray": Image.fromarray(rng.integers(0, 256, (7, 5), dtype=np.uint8), "L"),
        "rgba": Image.fromarray(rng.integers(0, 256, (9, 4, 4), dtype=np.uint8), "RGBA"),
        "palette": Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").convert("P"),
        "wide": Image.new("I;16", (300, 20), 1234),
    }
    c = wh.collection("images")
    c.insert_one({"_id": "i", **images, "list": [images["gray"], images["rgb"]]})
    got = c.find_one({"_id": "i"})
    for name, image in images.items():
        assert isinstance(got[name], Image.Image)
        assert (got[name].mode, got[name].size) == (image.mode, image.size), name
        assert np.array_equal(np.asarray(got[name]), np.asarray(image)), name
    assert got["palette"].getpalette() == images["palette"].getpalette()
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got["list"], [images["gray"],
                                                                                     images["rgb"]])] == [True, True]
    assert stored(c, "i")["rgb"]["codec"] == "image"

    # an image that came from a JPEG stays a JPEG (no re-encoding loss beyond the file's own)
    buffer = io.BytesIO()
    smooth = np.add.outer(np.arange(40), np.arange(60)).astype(np.uint8)
    Image.fromarray(np.stack([smooth, smooth[::-1], 255 - smooth], axis=-1), "RGB").save(buffer, format="JPEG",
                                                                                       quality=90)
    jpeg = Image.open(io.BytesIO(buffer.getvalue()))
    c.insert_one({"_id": "j", "photo": jpeg})
    photo = c.find_one({"_id": "j"})["photo"]
    assert photo.format == "JPEG" and (photo.mode, photo.size) == (jpeg.mode, jpeg.size)
    jpeg.load()
    assert np.abs(np.asarray(photo, dtype=np.int16) - np.asarray(jpeg, dtype=np.int16)).mean() < 2


def test_audio_round_trip(wh):
    c = wh.collection("clips")
    mono = Audio(np.sin(np.linspace(0, 100, 16000)).astype(np.float32), 16000)
    stereo = Audio(np.arange(2000, dtype=np.int16).reshape(1000, 2), 44100)
    short = Audio(np.array([1, -1], dtype=np.int16), 8000)  # small enough to stay inside the document
    c.insert_one({"_id": "a", "mono": mono, "stereo": stereo, "short": short})
    got = c.find_one({"_id": "a"})
    for name, clip in (("mono", mono), ("stereo", stereo), ("short", short)):
        assert isinstance(got[name], Audio) and got[name] == clip
        assert got[name].samples.dtype == clip.samples.dtype and got[name].samples.shape == clip.samples.shape
        assert got[name].sample_rate == clip.sample_rate
    assert got["mono"].seconds == 1.0
    assert stored(c, "a")["short"]["codec"] == "audio" and "_bin" in stored(c, "a")["short"]
    with pytest.raises(CodecError):
        Audio(np.zeros((2, 2, 2)), 100)
    with pytest.raises(CodecError):
        Audio(np.zeros(3), 0)


def test_user_type_by_import_path_with_instance_of(wh):
    c = wh.collection("points")
    datatype = c.register_type("point", encode_point, decode_point, instance_of=Point, description="2-D")
    assert (datatype.encoder, datatype.decoder, datatype.instance_of) == \
        (f"{MODULE}:encode_point", f"{MODULE}:decode_point", f"{MODULE}:Point")
    assert c.register_type("point", f"{MODULE}:encode_point", f"{MODULE}:decode_point",
                           instance_of=f"{MODULE}:Point", description="2-D") == datatype  # the same: a no-op
    with pytest.raises(DuplicateKey):
        c.register_type("point", encode_point, cc.decode_broken)
    catalog = wh.project().catalog
    assert [t.name for t in catalog.datatypes()] == ["point"] and catalog.datatype("point") == datatype
    # plain values are encoded automatically, anywhere in a document
    c.insert_one({"_id": "p", "where": Point(1, 2), "path": [Point(0, 0), {"end": Point(3, 4)}]})
    got = c.find_one({"_id": "p"})
    assert got["where"] == Point(1, 2) and got["path"] == [Point(0, 0), {"end": Point(3, 4)}]
    assert stored(c, "p")["where"]["codec"] == "type:point"
    c.update_one({"_id": "p"}, {"$set": {"where": Point(5, 6)}, "$push": {"path": Point(7, 8)}})
    got = c.find_one({"_id": "p"})
    assert got["where"] == Point(5, 6) and got["path"][-1] == Point(7, 8)
    # a type without instance_of is used through Encoded only; a replace keeps the new definition
    c.register_type("point", encode_point, decode_point, replace=True)
    with pytest.raises(CodecError, match="Point"):
        c.insert_one({"where": Point(1, 1)})
    with pytest.raises(CodecError):
        c.register_type("bad:name", encode_point, decode_point)
    with pytest.raises(CodecError):
        c.register_type("lambda", lambda p: b"", decode_point)


def test_encoded_values_and_raw_reads(wh):
    c = wh.collection("encoded")
    c.register_type("point", encode_point, decode_point)
    data = encode_point(Point(3, 4))
    c.insert_one({"_id": "e", "p": Encoded("point", data), "arr": np.arange(3), "n": 1})
    assert c.find_one({"_id": "e"})["p"] == Point(3, 4)
    raw = c.find_one({"_id": "e"}, raw=True)
    assert raw["p"] == Encoded("point", data) and raw["p"].data == data
    assert np.array_equal(raw["arr"], np.arange(3)) and raw["n"] == 1  # built-in codecs decode as ever
    assert [d["p"] for d in c.find({}, raw=True)] == [Encoded("point", data)]
    # a raw value written back is stored as it was
    c.insert_one({"_id": "copy", "p": raw["p"]})
    assert c.find_one({"_id": "copy"})["p"] == Point(3, 4)
    big = Encoded("point", encode_point(Point(1, 1)) * 1000)  # a blob, read raw without decoding
    c.insert_one({"_id": "big", "p": big})
    assert c.find_one({"_id": "big"}, raw=True)["p"] == big


def test_a_reader_that_cannot_import_the_decoder_gets_a_data_type_error(wh, monkeypatch):
    c = wh.collection("guarded")
    c.register_type("point", encode_point, decode_point)
    c.insert_one({"_id": "g", "p": Encoded("point", encode_point(Point(1, 2))), "n": 5})
    monkeypatch.delenv(mlwarehouse.codecs.imports.TRUSTED_MODULES_ENV, raising=False)
    monkeypatch.setattr(mlwarehouse.codecs.imports, "_trusted", set())  # another process: nothing trusted
    reader = Catalog(wh.project()).collection("guarded")
    with pytest.raises(DataTypeError) as caught:
        reader.find_one({"_id": "g"})
    assert "'point'" in str(caught.value) and f"{MODULE}:decode_point" in str(caught.value)
    assert reader.find_one({"_id": "g"}, raw=True)["p"] == Encoded("point", encode_point(Point(1, 2)))
    assert reader.find_one({"_id": "g"}, {"n": 1}) == {"_id": "g", "n": 5}  # other fields read fine
    monkeypatch.setenv(mlwarehouse.codecs.imports.TRUSTED_MODULES_ENV, MODULE)  # trusted: it reads
    assert reader.find_one({"_id": "g"})["p"] == Point(1, 2)


# -- bad input: a typed error, nothing half-written --------------------------------------------------------------

def test_unknown_data_type_in_encoded(wh):
    c = wh.collection("unknown_type")
    c.insert_one({"_id": "ok"})
    with pytest.raises(DataTypeError, match="'nope'"):
        c.insert_many([{"_id": "a", "v": 1}, {"_id": "b", "p": Encoded("nope", b"\x00" * 10)}])
    with pytest.raises(DataTypeError, match="'nope'"):
        c.update_one({"_id": "ok"}, {"$set": {"p": Encoded("nope", b"")}})
    assert [d for d in c.find()] == [{"_id": "ok", "_fold": c.find_one()["_fold"]}]
    assert list(wh.blobs.list()) == []


def test_a_value_its_decoder_cannot_read(wh):
    c = wh.collection("undecodable")
    c.register_type("fragile", encode_point, cc.decode_broken)
    c.insert_many([{"_id": "bad", "p": Encoded("fragile", b"12345678" * 2)}, {"_id": "good", "n": 1}])
    with pytest.raises(DataTypeError, match="'fragile' cannot decode a stored value"):
        c.find_one({"_id": "bad"})
    with pytest.raises(DataTypeError):
        list(c.find())
    assert c.find_one({"_id": "bad"}, raw=True)["p"] == Encoded("fragile", b"12345678" * 2)
    assert c.find_one({"_id": "good"})["n"] == 1 and c.count_documents() == 2
    assert c.delete_one({"_id": "bad"}).deleted_count == 1  # a bad value can still be deleted


def test_a_model_that_raises_inline(wh):
    c = wh.collection("raising")
    c.insert_many([{"_id": "a", "x": 1}, {"_id": "b", "x": 2}])
    with pytest.raises(ListenerError, match="broken model"):  # backfill: the documents say why
        c.attach("bad", lc.broken, key="x")
    assert c.progress("bad") == {"done": 0, "pending": 0, "failed": 2, "skipped": 0}
    error = c.find_one({"_id": "a"}, {"_listeners": 1})["_listeners"]["bad"]["error"]
    assert "ValueError" in error and "broken model cannot take 1" in error
    with pytest.raises(ListenerError, match="nothing was inserted"):
        c.insert_many([{"_id": "c", "x": 3}, {"_id": "d", "y": 0}])
    assert sorted(d["_id"] for d in c.find()) == ["a", "b"]
    assert c.retry("bad") == 2 and c.progress("bad")["failed"] == 2  # retried inline: failed again, not raised
    c.detach("bad")
    c.insert_one({"_id": "c", "x": 3})
    assert c.count_documents() == 3 and c.count_documents({"_outputs": {"$exists": True}}) == 0


def test_a_listener_over_a_missing_field(wh):
    c = wh.collection("missing")
    c.insert_many([{"_id": "a", "x": 1}, {"_id": "b", "x": 2}])
    with pytest.raises(QueryError, match="'typo'"):
        c.attach("l", lc.double, key="typo")
    assert c.listeners() == [] and c.count_documents({"_listeners": {"$exists": True}}) == 0
    empty = wh.collection("empty_one")  # nothing to check yet: attached, documents come later
    empty.attach("l", lc.double, key="later")
    assert [x.name for x in empty.listeners()] == ["l"]


def test_dependency_cycles_and_overlaps_are_refused(wh):
    c = wh.collection("graph")
    c.insert_one({"_id": "a", "x": {"a": 1, "b": 2}})
    with pytest.raises(QueryError, match="no listener"):  # reads its own output, which nobody writes yet
        c.attach("self", lc.double, key="_outputs.x.self")
    c.attach("first", lc.double, key="x.a")
    with pytest.raises(QueryError, match="no listener"):
        c.attach("second", lc.plus_one, key="_outputs.x.a.nobody")
    with pytest.raises(QueryError, match="overlaps"):  # would write _outputs.x.a, where first's output is
        c.attach("a", lc.double, key="x")
    for key in ("_outputs", "_listeners.first.status", "_rev", "_id", "_blobs"):
        with pytest.raises(QueryError):
            c.attach("reader", lc.double, key=key)
    c.attach("second", lc.plus_one, key="_outputs.x.a.first")
    assert c.listener("second").upstream == ("first",)
    assert lc._out(c.find_one({"_id": "a"}), "_outputs.x.a.first", "second") == 3
    assert [x.name for x in c.listeners()] == ["first", "second"]


def test_a_document_too_large(wh):
    c = wh.collection("large")
    c.insert_one({"_id": "ok", "n": 1})
    many = {f"k{i}": "v" * 200 for i in range(90_000)}  # 18 MB of small strings, each inline
    with pytest.raises(InvalidDocument, match="MAX_DOCUMENT_BYTES"):
        c.insert_many([{"_id": "small"}, many])
    with pytest.raises(InvalidDocument, match="MAX_DOCUMENT_BYTES"):
        c.update_one({"_id": "ok"}, {"$set": {f"k{i}": "v" * 900_000 for i in range(20)}})  # each one inline
    assert [d["_id"] for d in c.find()] == ["ok"] and set(c.find_one({"_id": "ok"})) == {"_id", "n", "_fold"}
    # large JSON values are stored as blobs, so a document of the same size in few fields is fine
    roomy = {f"k{i}": "v" * 2_000_000 for i in range(3)}
    c.insert_one({"_id": "roomy", **roomy, "nested": {"many": many}})
    got = c.find_one({"_id": "roomy"})
    assert got["k2"] == roomy["k2"] and got["nested"]["many"] == many
    assert c.count_documents({"_id": "roomy"}) == 1


def test_reserved_fields_are_refused(wh):
    c = wh.collection("reserved")
    c.insert_one({"_id": "a", "v": 1})
    for doc in ({"_outputs": {"x": {"l": 1}}}, {"_rev": "r"}, {"_listeners": {}}, {"_blobs": []},
                {"_blob": "k"}, {"_tuple": [1]}, {1: "int key"}, {"_id": ""}, {"_fold": "test"}):
        with pytest.raises(InvalidDocument):
            c.insert_one(doc)
        with pytest.raises(InvalidDocument):
            c.insert_many([{"_id": "first"}, doc])
        with pytest.raises(InvalidDocument):
            c.replace_one({"_id": "a"}, doc)
    for update in ({"$set": {"_outputs.x.l": 1}}, {"$set": {"_rev": "r"}}, {"$unset": {"_listeners": ""}},
                   {"$set": {"_id": "b"}}, {"$set": {"_blob": 1}}, {"$push": {"_blobs": "k"}},
                   {"$inc": {"_outputs.x": 1}}, {"v": 2}, {"$set": 5}):
        with pytest.raises(InvalidDocument):
            c.update_one({"_id": "a"}, update)
        with pytest.raises(InvalidDocument):
            c.update_many({}, update, upsert=True)
    assert [{k: v for k, v in d.items() if k != "_fold"} for d in c.find({}, {"_rev": 0})] == [{"_id": "a", "v": 1}]


def test_bad_listener_arguments(wh):
    c = wh.collection("names")
    c.insert_one({"x": 1})
    for name in ("", "1st", "a-b", "a.b", "x" * 65, "é", 3, None, "$x"):
        with pytest.raises(QueryError):
            c.attach(name, lc.double, key="x")
    for kwargs in ({"compute": "gpu"}, {"batch_size": 0}, {"batch_size": True}, {"where": {"x": {"$bad": 1}}},
                   {"key": "a..b"}):
        with pytest.raises(QueryError):
            c.attach("ok", lc.double, **{"key": "x", **kwargs})
    for model in (lambda x: x, 42, f"{MODULE}:no_such_function"):
        with pytest.raises(QueryError):
            c.attach("ok", model, key="x")
    assert c.listeners() == [] and wh.tasks.find(schema.LISTENER_TASK) == []
    with pytest.raises(QueryError):
        wh.collection("$bad")
    c.attach("ok", f"{lc.__name__}:double", key="x")  # a model by its import path
    assert lc._out(c.find_one(), "x", "ok") == 2
