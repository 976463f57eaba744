"""The SuperDuperDB layer: the getting-started example of SuperDuperDB's docs with only its import changed, in
this process and in fresh ones, with outputs kept in step with updates, replacements and deletes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from mlwarehouse.codecs.datatypes import DataTypeError, Encoded  # noqa: E402
from mlwarehouse.compat.superduperdb import SuperDuperClient  # noqa: E402
from mlwarehouse.errors import InvalidDocument  # noqa: E402
from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: E402,F401

#: the example's decoder wraps a read-only buffer, which torch warns about (the example's code, kept as written)
pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

#: ``my_module.py`` of SuperDuperDB's getting-started example, as written there
MY_MODULE = textwrap.dedent("""\
    import numpy
    import torch


    class FloatTensor:
        @staticmethod
        def encode(x):
            x = x.numpy()
            assert x.dtype == numpy.float32
            return memoryview(x).tobytes()

        @staticmethod
        def decode(bytes_):
            array = numpy.frombuffer(bytes_, dtype=numpy.float32)
            return torch.from_numpy(array).type(torch.float)
""")

#: a second converter, for collections with two
OTHER_MODULE = textwrap.dedent("""\
    class Utf8:
        @classmethod
        def encode(cls, text):
            return text.encode()

        @classmethod
        def decode(cls, data):
            return data.decode()


    class Stateful:
        def encode(self, x):
            return x

        def decode(self, data):
            return data
""")

#: the example's session, its import changed from ``superduperdb.client``
EXAMPLE = textwrap.dedent("""\
    from mlwarehouse.compat.superduperdb import SuperDuperClient
    from my_module import FloatTensor
    import torch
    docs = SuperDuperClient().my_database.my_collection
    docs.create_converter('float_tensor', FloatTensor())
    docs.create_model('linear_embedding', torch.nn.Linear(1024, 64), key='x')
    docs.insert_many([{'x': {'_content': {'bytes': FloatTensor.encode(torch.randn(1024))}}} for _ in range(100)])
    docs.find_one()
""")


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """``my_module`` (and ``more_converters``) importable, and ``SuperDuperClient()`` on a fresh warehouse."""
    (tmp_path / "my_module.py").write_text(MY_MODULE)
    (tmp_path / "more_converters.py").write_text(OTHER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_module", "more_converters"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "wh"))
    yield tmp_path
    for name in ("my_module", "more_converters"):
        sys.modules.pop(name, None)


def expected_inputs_and_model(seed: int):
    """What the example makes after ``torch.manual_seed(seed)``: its model, then its 100 inputs."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(1024, 64)
    return [torch.randn(1024) for _ in range(100)], linear


@pytest.fixture
def example(modules):
    """The example run as written in this process; its collection, inputs and model."""
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(EXAMPLE, "getting_started.py", "exec"), namespace)
    inputs, linear = expected_inputs_and_model(0)
    yield namespace["docs"], inputs, linear
    namespace["docs"].database.client.close()


def encode(x) -> dict:
    return {"_content": {"bytes": x.numpy().tobytes()}}


def test_the_getting_started_example_runs_as_written(example):
    docs, inputs, linear = example
    doc = docs.find_one()
    assert set(doc) == {"_id", "x", "_fold", "_outputs"} and isinstance(doc["_id"], str)
    assert doc["_fold"] in ("train", "valid")
    x = doc["x"]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (1024,)
    assert any(torch.equal(x, i) for i in inputs)
    output = doc["_outputs"]["x"]["linear_embedding"]
    assert output.shape == (64,)
    torch.testing.assert_close(output, linear(x).detach(), atol=1e-5, rtol=0)
    stored = sorted(d["x"].numpy().tobytes() for d in docs.find())
    assert stored == sorted(i.numpy().tobytes() for i in inputs)
    assert docs.count_documents({"_outputs.x.linear_embedding": {"$exists": True}}) == 100
    assert docs.count_documents({"_fold": "train"}) > 80
    assert docs.list_converters() == ["float_tensor"] and docs.list_models() == ["linear_embedding"]


def test_outputs_follow_updates_replacements_and_deletes(example):
    docs, inputs, linear = example
    first, second = [d["_id"] for d in docs.find({}, {"_id": 1}, limit=2)]
    new = torch.randn(1024)
    assert docs.update_one({"_id": first}, {"$set": {"x": encode(new), "n": 1}}).modified_count == 1
    doc = docs.find_one({"_id": first})
    assert torch.equal(doc["x"], new) and doc["n"] == 1
    torch.testing.assert_close(doc["_outputs"]["x"]["linear_embedding"], linear(new).detach(), atol=1e-5, rtol=0)
    other = torch.randn(1024)
    docs.replace_one({"_id": second}, {"x": encode(other), "tag": "b"})
    doc = docs.find_one({"_id": second})
    assert torch.equal(doc["x"], other) and doc["tag"] == "b"
    torch.testing.assert_close(doc["_outputs"]["x"]["linear_embedding"], linear(other).detach(), atol=1e-5, rtol=0)
    assert docs.delete_one({"_id": first}).deleted_count == 1
    assert docs.find_one({"_id": first}) is None and docs.count_documents() == 99
    result = docs.insert_one({"x": encode(new)})
    doc = docs.find_one({"_id": result.inserted_id})
    torch.testing.assert_close(doc["_outputs"]["x"]["linear_embedding"], linear(new).detach(), atol=1e-5, rtol=0)
    upserted = docs.replace_one({"tag": "c"}, {"x": encode(other), "tag": "c"}, upsert=True).upserted_id
    doc = docs.find_one({"tag": "c"})
    assert doc["_id"] == upserted and docs.find_one({"tag": "c"}, raw=True)["x"].datatype == "float_tensor"
    torch.testing.assert_close(doc["_outputs"]["x"]["linear_embedding"], linear(other).detach(), atol=1e-5, rtol=0)
    assert docs.update_many({}, {"$set": {"flag": True}}).matched_count == 101
    assert docs.delete_many({"flag": True}).deleted_count == 101 and docs.count_documents({}) == 0


def test_delete_model_unsets_its_outputs(example):
    docs, _, _ = example
    assert docs.delete_model("linear_embedding") == 100
    assert docs.list_models() == []
    assert docs.count_documents({"_outputs": {"$exists": True}}) == 0
    assert "_outputs" not in docs.find_one()
    docs.insert_one({"x": encode(torch.randn(1024))})  # nothing computes it any more
    assert docs.count_documents({"_outputs": {"$exists": True}}) == 0


def test_a_value_without_its_converter_needs_the_only_one(modules):
    from more_converters import Stateful, Utf8
    from my_module import FloatTensor
    docs = SuperDuperClient()["db"]["coll"]
    docs.create_converter("float_tensor", FloatTensor)
    docs.create_converter("utf8", Utf8())
    with pytest.raises(InvalidDocument, match="'float_tensor', 'utf8'"):
        docs.insert_one({"x": {"_content": {"bytes": b"abc"}}})
    with pytest.raises(InvalidDocument, match="'float_tensor', 'utf8'"):
        docs.update_many({}, {"$set": {"x": {"_content": {"bytes": b"abc"}}}})
    with pytest.raises(DataTypeError, match="'nope'"):
        docs.insert_one({"x": {"_content": {"bytes": b"abc", "converter": "nope"}}})
    with pytest.raises(DataTypeError, match="staticmethod or a classmethod"):
        docs.create_converter("stateful", Stateful())
    assert docs.count_documents() == 0
    # named converters, nested anywhere in a document
    t = torch.randn(4)
    ids = docs.insert_many([{"a": [{"_content": {"bytes": b"hi", "converter": "utf8"}}, 3],
                             "b": {"c": {"_content": {"bytes": FloatTensor.encode(t), "converter": "float_tensor"}}}}
                            ]).inserted_ids
    doc = docs.find_one({"_id": ids[0]})
    assert doc["a"] == ["hi", 3] and torch.equal(doc["b"]["c"], t)
    raw = docs.find_one({"_id": ids[0]}, raw=True)
    assert raw["a"][0] == Encoded("utf8", b"hi")
    docs.update_one({"_id": ids[0]}, {"$push": {"a": {"_content": {"bytes": b"yo", "converter": "utf8"}}}})
    assert docs.find_one({"_id": ids[0]})["a"] == ["hi", 3, "yo"]
    assert sorted(docs.list_converters()) == ["float_tensor", "utf8"]
    assert docs.database.list_collection_names() == ["coll"]
    assert docs.database.client.list_database_names() == ["db"]
    assert SuperDuperClient().db.coll.find_one()["a"][0] == "hi"  # the same data by attribute


def test_unsupported_model_options_say_so(modules):
    docs = SuperDuperClient().db.coll
    linear = torch.nn.Linear(2, 1)
    with pytest.raises(NotImplementedError, match="_base"):
        docs.create_model("m", linear)
    with pytest.raises(NotImplementedError, match="active=False"):
        docs.create_model("m", linear, key="x", active=False)
    with pytest.raises(NotImplementedError, match="dependencies"):
        docs.create_model("m", linear, key="x", dependencies=["other"])
    with pytest.raises(TypeError, match="loader_kwargs"):
        docs.create_model("m", linear, key="x", loader_kwargs={})
    assert docs.list_models() == []
    docs.insert_one({"x": torch.ones(2), "y": 1})
    docs.create_model("m", linear, key="x", filter={"y": 1})
    head = torch.nn.Linear(1, 1)
    docs.create_model("n", head, key="_outputs.x.m", dependencies=["m"])
    outputs = docs.find_one()["_outputs"]
    torch.testing.assert_close(outputs["x"]["m"], linear(torch.ones(2)).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["_outputs"]["x"]["m"]["n"], head(outputs["x"]["m"]).detach(), atol=1e-5,
                               rtol=0)
    assert sorted(docs.list_models()) == ["m", "n"]
    docs.delete_model("m")
    assert docs.list_models() == [] and "_outputs" not in docs.find_one()


def run(script: str, env: dict, cwd) -> str:
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_fresh_processes_run_the_example_and_read_only_trusted_converters(modules, subprocess_env):
    (modules / "getting_started.py").write_text(EXAMPLE + "print('found', len(docs.find_one()['x']))\n")
    env = {**subprocess_env, "PYTHONPATH": f"{modules}:{subprocess_env['PYTHONPATH']}"}
    env.pop("MLW_TRUSTED_MODULES", None)
    done = subprocess.run([sys.executable, str(modules / "getting_started.py")], env=env, cwd=modules,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "found 1024" in done.stdout
    reader = textwrap.dedent("""\
        from mlwarehouse.codecs.datatypes import DataTypeError
        from mlwarehouse.compat.superduperdb import SuperDuperClient
        docs = SuperDuperClient().my_database.my_collection
        try:
            docs.find_one()
            print("decoded")
        except DataTypeError as exc:
            print("refused:", exc)
        raw = docs.find_one(raw=True)
        print("raw", type(raw["x"]).__name__, raw["x"].datatype, len(raw["x"].data))
    """)
    out = run(reader, env, modules)
    assert "refused:" in out and "'my_module:FloatTensor.decode'" in out and "MLW_TRUSTED_MODULES" in out
    assert "raw Encoded float_tensor 4096" in out
    out = run(reader.replace('print("decoded")', 'print("decoded", docs.find_one()["x"].dtype, '
                                                 'docs.count_documents({}))'),
              {**env, "MLW_TRUSTED_MODULES": "my_module"}, modules)
    assert "decoded torch.float32 100" in out


def test_host_and_port_name_a_mongodb_server(modules, mongo_server):  # noqa: F811
    from my_module import FloatTensor
    uri = fresh_uri(mongo_server)
    client = SuperDuperClient(host=uri)
    try:
        docs = client.my_database.my_collection
        docs.create_converter("float_tensor", FloatTensor())
        docs.create_model("linear_embedding", torch.nn.Linear(1024, 8), key="x")
        x = torch.randn(1024)
        docs.insert_many([{"x": encode(x)}])
        doc = docs.find_one()
        assert torch.equal(doc["x"], x) and doc["_outputs"]["x"]["linear_embedding"].shape == (8,)
        assert client.warehouse.settings.index_uri == uri
    finally:
        client.warehouse.index.conn.drop_database()
        client.close()
    with pytest.raises(TypeError, match="not both"):
        SuperDuperClient(host="127.0.0.1", port=27017, uri="mongodb://127.0.0.1:27017/")
