"""The HTTP deployer (``mlw serve NAME@ALIAS``): predictions in JSON and npy from the model holding an alias, bad
payloads refused with 4xx (never unpickled), health and version, and, in a real server process, ten alias moves
under steady traffic without one failed request, each answer computed wholly by the model it names; SIGTERM exits 0.
"""

from __future__ import annotations

import io
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, wait_for

from mlwarehouse.loops.follow import follow
from mlwarehouse.loops.server import NPY, PayloadError, decode_npy, make_app

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

X = [[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]  # a Linear of constant weight k answers [[10k], [4k]]


def _linear(value: float):
    net = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.constant_(net.weight, value)
    return net


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _post_npy(client, array, **kwargs):
    return client.post("/predict", content=_npy(array), headers={"content-type": NPY}, **kwargs)


@pytest.fixture
def lab(wh):
    ones = wh.models.save(_linear(1.0), "mlp")
    twos = wh.models.save(_linear(2.0), "mlp")
    wh.models.aliases.set("mlp", "champion", ones)
    served = follow(wh, "mlp@champion", poll=0.05)
    yield wh, served, ones, twos
    served.close()


# -- in process -----------------------------------------------------------------------------------------------
def test_predicts_in_json_and_npy_with_the_model_that_answered(lab):
    wh, served, ones, _ = lab
    with TestClient(make_app(served)) as client:
        answer = client.post("/predict", json={"inputs": X})
        assert answer.status_code == 200 and answer.json() == {"outputs": [[10.0], [4.0]], "model": ones.id,
                                                               "version": 1}
        assert (answer.headers["x-model"], answer.headers["x-alias-version"]) == (ones.id, "1")
        ints = client.post("/predict", json={"inputs": [[1, 2, 3, 4]]})  # JSON numbers go in the model's float type
        assert ints.status_code == 200 and ints.json()["outputs"] == [[10.0]]
        typed = client.post("/predict", json={"inputs": [[0.5, 0.5, 0.5, 0.5]], "dtype": "float64"})
        assert typed.json()["outputs"] == [[2.0]]
        overflow = client.post("/predict", json={"inputs": [[1e39, 0, 0, 0], X[1]]})  # inf in float32
        assert overflow.status_code == 200 and overflow.json()["outputs"] == [[None], [4.0]]  # JSON has no inf
        assert np.load(io.BytesIO(_post_npy(client, np.array([[1e39, 0, 0, 0]])).content)).tolist() == [[np.inf]]

        for array in (np.asarray(X, np.float32), np.asarray(X, ">f8"), np.asfortranarray(np.asarray(X))):
            answer = _post_npy(client, array)  # any byte order or layout; floats in the model's type
            assert answer.status_code == 200 and answer.headers["content-type"] == NPY
            out = np.load(io.BytesIO(answer.content), allow_pickle=False)
            assert out.dtype == np.float32 and out.tolist() == [[10.0], [4.0]]
            assert (answer.headers["x-model"], answer.headers["x-alias-version"]) == (ones.id, "1")


def test_typed_integer_inputs_reach_an_embedding_as_integers(wh):
    table = torch.nn.Embedding(5, 2)
    with torch.no_grad():
        table.weight.copy_(torch.arange(10, dtype=torch.float32).reshape(5, 2))
    wh.models.aliases.set("emb", "champion", wh.models.save(table, "emb"))
    with follow(wh, "emb@champion", poll=0.05) as served, TestClient(make_app(served)) as client:
        answer = client.post("/predict", json={"inputs": [3, 1], "dtype": "int64"})
        assert answer.status_code == 200 and answer.json()["outputs"] == [[6.0, 7.0], [2.0, 3.0]]
        assert _post_npy(client, np.array([4], np.int32)).status_code == 200
        untyped = client.post("/predict", json={"inputs": [3, 1]})  # untyped numbers are floats: the model raises
        assert untyped.status_code == 500 and "the model raised" in untyped.json()["error"]


def test_bad_payloads_are_refused_with_4xx_and_never_unpickled(lab, tmp_path):
    wh, served, ones, _ = lab
    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pickled = io.BytesIO()
    np.save(pickled, np.array([Bomb()], dtype=object), allow_pickle=True)
    lying = _npy(np.zeros(2)).replace(b"'shape': (2,), ", b"'shape': (99999999999,), ")  # 16 bytes of data

    def chunks():
        for _ in range(20):
            yield b" " * 100

    with TestClient(make_app(served, max_bytes=1000, max_batch=8)) as client:
        cases = [
            (client.post("/predict", content=b"{" + b" " * 2000 + b"}", headers={"content-type": "application/json"}),
             413, "over the limit of 1000"),
            (client.post("/predict", content=chunks(), headers={"content-type": "application/json"}),
             413, "over the limit of 1000"),  # chunked: no length said, cut when it is too long
            (client.post("/predict", json={"inputs": [[1.0] * 4] * 9}), 413, "batch of 9 rows"),
            (client.post("/predict", content=b"{nope", headers={"content-type": "application/json"}),
             400, "not JSON"),
            (client.post("/predict", content=b"\xff\xfe", headers={"content-type": "application/json"}),
             400, "not JSON"),
            (client.post("/predict", json=[1, 2]), 422, '{"inputs"'),
            (client.post("/predict", json={"inputs": X, "extra": 1}), 422, "unknown keys ['extra']"),
            (client.post("/predict", json={"inputs": [[1, 2], [3]]}), 422, "rectangular"),
            (client.post("/predict", json={"inputs": [["1", "2"]]}), 422, "numbers only"),
            (client.post("/predict", json={"inputs": [None, 1]}), 422, "numbers only"),
            (client.post("/predict", json={"inputs": X, "dtype": "object"}), 422, "dtype 'object'"),
            (client.post("/predict", json={"inputs": [1.5], "dtype": "int64"}), 422, "cannot be int64"),
            (client.post("/predict", content=b"1,2,3", headers={"content-type": "text/plain"}), 415, "x-npy"),
            (client.post("/predict", content=b"not npy", headers={"content-type": NPY}), 400, "not npy bytes"),
            (client.post("/predict", content=lying, headers={"content-type": NPY}), 400, "where its header"),
            (client.post("/predict", content=pickled.getvalue(), headers={"content-type": NPY}), 422, "pickle"),
            (_post_npy(client, np.array(["a", "b"])), 422, "refused"),
            (_post_npy(client, np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])), 422, "refused"),
        ]
        for answer, status, words in cases:
            assert answer.status_code == status, (status, answer.text)
            assert words in answer.json()["error"], (words, answer.text)
        assert not marker.exists()  # the pickled payload was never loaded

        wrong = client.post("/predict", json={"inputs": [[1.0, 2.0, 3.0]]})  # the model raises: 500, and serves on
        assert wrong.status_code == 500 and wrong.json()["model"] == ones.id
        assert "shapes cannot be multiplied" in wrong.json()["error"] and "\n" not in wrong.json()["error"]
        assert client.post("/predict", json={"inputs": X}).status_code == 200
        assert client.get("/predict").status_code == 405 and client.get("/nothing").status_code == 404
        counts = client.get("/version").json()
        assert (counts["answered"], counts["refused"], counts["failed"]) == (1, len(cases), 1)


def test_health_and_version_follow_swaps_removal_and_errors(lab):
    wh, served, ones, twos = lab
    with TestClient(make_app(served)) as client:
        first = client.get("/version").json()
        assert first["model"] == ones.id and first["version"] == 1 and first["swaps"] == 0
        assert first["spelling"] == "mlp@champion" and not first["removed"] and first["last_error"] is None
        assert client.get("/health").json() == {"status": "ok", "following": True, "model": ones.id,
                                                 "version": 1, "removed": False}
        wh.models.aliases.set("mlp", "champion", twos)
        wait_for(lambda: client.get("/version").json()["model"] == twos.id, timeout=5)
        second = client.get("/version").json()
        assert second["swaps"] == 1 and second["version"] == 2 and second["since"] > first["since"]
        assert client.post("/predict", json={"inputs": X}).json() == {"outputs": [[20.0], [8.0]],
                                                                      "model": twos.id, "version": 2}
        arrays = wh.models.save({"w": np.ones(2)}, "mlp")  # loads as arrays: not callable
        wh.models.aliases.set("mlp", "champion", arrays)
        wait_for(lambda: client.get("/version").json()["last_error"] is not None, timeout=5)
        assert "not callable" in client.get("/version").json()["last_error"]
        assert client.post("/predict", json={"inputs": X}).json()["model"] == twos.id  # the old one serves on
        wh.models.aliases.remove("mlp", "champion")
        wait_for(lambda: client.get("/health").json()["removed"], timeout=5)
        assert client.get("/health").status_code == 200
        served.close()
        stopped = client.get("/health")
        assert stopped.status_code == 503 and stopped.json()["status"] == "stopped"
        assert client.post("/predict", json={"inputs": X}).json()["model"] == twos.id  # still answers


def test_a_host_not_served_is_refused(lab):
    _, served, ones, _ = lab
    app = make_app(served, allowed_hosts=["localhost", "127.0.0.1"])
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        assert client.get("/health").status_code == 200
        rebound = client.post("/predict", json={"inputs": X}, headers={"host": "evil.example:8080"})
        assert rebound.status_code == 400 and "not served here" in rebound.json()["error"]


def test_npy_headers_are_read_without_allocating():
    array = np.arange(6, dtype=">i2").reshape(2, 3)
    decoded = decode_npy(bytearray(_npy(array)))
    assert decoded.dtype == np.int16 and decoded.dtype.isnative and decoded.tolist() == array.tolist()
    assert decode_npy(bytearray(_npy(np.float64(2.5)))).tolist() == 2.5
    huge = _npy(np.zeros(1)).replace(b"'shape': (1,), ", b"'shape': (10000000000000000,), ")
    with pytest.raises(PayloadError, match="bytes of data where its header") as refused:  # before allocating
        decode_npy(bytearray(huge))
    assert refused.value.status == 400
    with pytest.raises(PayloadError, match="not npy bytes"):  # a header that is not a literal
        decode_npy(bytearray(_npy(np.zeros(1)).replace(b"'shape': (1,), ", b"'shape': (2**9,), ")))


# -- a real server process ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], env: dict, tmp_path: Path, name: str):
    """Start a server; (process, base URL) once /health answers 200."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    proc = subprocess.Popen(args, env=env, stdout=out.open("w"), stderr=err.open("w"))
    ready = re.compile(r"on http://127\.0\.0\.1:(\d+)/predict")
    try:
        wait_for(lambda: ready.search(out.read_text()) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, err.read_text()
        url = f"http://127.0.0.1:{ready.search(out.read_text()).group(1)}"
        wait_for(lambda: _healthy(url), timeout=20)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, url


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(proc, sig=signal.SIGTERM, within: float = 5.0) -> tuple[int, float]:
    start = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"the server did not exit within {within} s of {sig!r}") from None
    return code, time.monotonic() - start


def test_ten_alias_moves_under_steady_traffic_drop_nothing_and_never_mix(wh, tmp_path, subprocess_env):
    nets = [_linear(float(k + 1)) for k in range(11)]
    models = [wh.models.save(net, "mlp") for net in nets]
    expected = {m.id: net(torch.tensor(X)).detach().tolist() for m, net in zip(models, nets)}
    assert len({str(v) for v in expected.values()}) == 11  # each output names its model
    wh.models.aliases.set("mlp", "champion", models[0])
    mlw = shutil.which("mlw", path=str(Path(sys.executable).parent))
    port = _free_port()
    proc, url = _start([mlw, "serve", "mlp@champion", "--port", str(port), "--poll", "0.05"], subprocess_env,
                       tmp_path, "serve")
    assert url.endswith(f":{port}")
    stop = threading.Event()
    answers: dict[str, list] = {"json": [], "npy": []}  # (time received, status, model, version, outputs)
    errors: list[BaseException] = []

    def client(kind: str) -> None:
        try:
            with httpx.Client(base_url=url, timeout=10) as http:
                while not stop.is_set():
                    if kind == "json":
                        r = http.post("/predict", json={"inputs": X})
                        doc = r.json()
                        got = (r.status_code, doc.get("model"), doc.get("version"), doc.get("outputs"))
                    else:
                        r = http.post("/predict", content=_npy(np.asarray(X, np.float32)),
                                      headers={"content-type": NPY})
                        outputs = np.load(io.BytesIO(r.content), allow_pickle=False).tolist() \
                            if r.status_code == 200 else r.text
                        got = (r.status_code, r.headers.get("x-model"), int(r.headers.get("x-alias-version", -1)),
                               outputs)
                    answers[kind].append((time.monotonic(), *got))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(kind,)) for kind in answers]
    latencies = []
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: all(answers.values()), timeout=10)
        for k in range(1, 11):
            target = models[k].id
            moved = time.monotonic()
            wh.models.aliases.set("mlp", "champion", models[k])
            wait_for(lambda: errors or all(a and a[-1][2] == target for a in answers.values()), timeout=10)
            assert not errors, errors
            latencies.append(min(a[0] for kind in answers for a in answers[kind] if a[2] == target) - moved)
            time.sleep(0.1)  # traffic on each holder for a while
        stop.set()
        for thread in threads:
            thread.join(15)
        status = httpx.get(f"{url}/version", timeout=5).json()
    finally:
        stop.set()
        code, took = _stop(proc)
    assert not errors, errors
    assert code == 0 and took < 5.0
    by_version = {change.doc["version"]: change.doc["model"] for change in wh.models.aliases.history("mlp",
                                                                                                       "champion")}
    assert sorted(by_version) == list(range(1, 12))
    total = 0
    for kind, seen in answers.items():
        assert all(status == 200 for _, status, *_ in seen), [a for a in seen if a[1] != 200][:3]
        for _, _, model, version, outputs in seen:
            assert outputs == expected[model], (kind, model, outputs)  # computed wholly by the model it names
            assert by_version[version] == model  # and the version is the change that made it the holder
        versions = [a[3] for a in seen]
        assert versions == sorted(versions)  # never backwards
        assert {a[2] for a in seen} == set(expected)  # each of the 11 models answered, after its promotion
        total += len(seen)
    assert status["swaps"] == 10 and status["model"] == models[10].id and status["version"] == 11
    assert status["failed"] == 0 and status["refused"] == 0 and status["answered"] >= total
    print(f"{total} requests ({len(answers['json'])} JSON, {len(answers['npy'])} npy), 0 failed; "  # noqa: T201
          f"swap seen by a client after {min(latencies) * 1000:.0f}-{max(latencies) * 1000:.0f} ms "
          f"(median {sorted(latencies)[5] * 1000:.0f} ms); SIGTERM exit in {took:.2f} s")


def test_python_m_serves_on_a_free_port_limits_bodies_and_exits_0_on_sigterm(wh, tmp_path, subprocess_env):
    wh.models.aliases.set("mlp", "champion", wh.models.save(_linear(3.0), "mlp"))
    proc, url = _start([PYTHON, "-m", "mlwarehouse.loops.server", "mlp@champion", "--port", "0",
                        "--max-bytes", "1000"], subprocess_env, tmp_path, "python-m")
    try:
        assert httpx.post(f"{url}/predict", json={"inputs": X}).json()["outputs"] == [[30.0], [12.0]]
        big = httpx.post(f"{url}/predict", json={"inputs": [[1.0] * 4] * 100})
        assert big.status_code == 413 and "over the limit of 1000" in big.json()["error"]
        rebound = httpx.get(f"{url}/health", headers={"host": "evil.example"})
        assert rebound.status_code == 400
    finally:
        code, took = _stop(proc)
    assert code == 0 and took < 5.0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_mlw_serve_says_what_is_wrong_in_one_line(wh, subprocess_env):
    mlw = shutil.which("mlw", path=str(Path(sys.executable).parent))
    missing = subprocess.run([mlw, "serve", "mlp@nobody", "--port", "0"], env=subprocess_env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and "points at no model" in missing.stderr and "Traceback" not in missing.stderr
    usage = subprocess.run([mlw, "serve"], env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "mlw serve" in usage.stderr and "spelling" in usage.stderr
