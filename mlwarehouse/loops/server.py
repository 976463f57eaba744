"""The HTTP deployer: ``mlw serve mlp@champion --port 8080`` serves predictions from whatever model holds an alias.

The model comes from :func:`mlwarehouse.loops.follow.follow`, so the server swaps to each new holder of the alias
without dropping a request: the new model is loaded fully before it answers, a holder that cannot load leaves the
old one serving, and each request runs wholly on one model.

Endpoints (FastAPI, run by uvicorn; bound to 127.0.0.1 unless ``--host`` says otherwise):

- ``POST /predict``: ``Content-Type: application/json`` with ``{"inputs": nested lists of numbers, "dtype":
  optional}`` answered ``{"outputs": ..., "model": id, "version": alias version}``; or ``application/x-npy`` (the
  bytes of ``np.save``) answered in npy, the model and version in the ``X-Model`` and ``X-Alias-Version`` headers
  (JSON answers carry them too). The id and version are those of the model that computed the outputs: a request
  reads the served (id, version, model) once (:meth:`FollowedModel.current`).
- ``GET /health``: 200 ``{"status": "ok", "following": true, ...}``; 503 once the follower has stopped.
- ``GET /version``: the model served, its alias version, swaps, since when it is served, the spelling, whether the
  alias was removed, the last load error.

Inputs: a torch module gets a tensor, floating inputs in its parameters' float type (as the evaluator does), other
types as sent; JSON numbers without a ``dtype`` count as floats (float32 for a module without float parameters or
a plain callable). Outputs: tensors, arrays,
numbers and dicts/lists of them; in JSON a non-finite number is ``null`` (ask in npy for exact values).

Client errors never answer 500: 413 for a body over ``--max-bytes`` (read in chunks, refused as soon as it is too
long) or a batch over ``--max-batch``, 400 for a body that does not decode, 422 for a decoded body that is no valid
request, 415 for another content type, 400 for a ``Host`` not served (DNS rebinding). A model that raises answers
500 with its message, and the server goes on. An npy body is read without ``np.load``: its header is parsed as a
literal, only plain number types are accepted, and the data must be exactly the size the header says, so nothing
unpickles and a forged header cannot make the server allocate. The model runs in a thread pool, never on the event
loop (so do decoding and encoding). SIGTERM or Ctrl-C stop accepting, let the requests in flight finish, close the
follower and exit 0.

Run it: ``mlw serve mlp@champion --port 8080`` or ``python -m mlwarehouse.loops.server mlp@champion``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import math
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np

from mlwarehouse.errors import ConfigError, QueryError, WarehouseError
from mlwarehouse.ids import utc_now
from mlwarehouse.loops.follow import FollowedModel, follow

try:  # in the module's names, where FastAPI reads the routes' annotations
    from starlette.requests import Request
except ImportError:  # without the ui extra: make_app says what to install
    Request = None  # type: ignore[assignment,misc]

__all__ = ["make_app", "serve", "main", "PayloadError", "decode_npy", "decode_json", "NPY", "DEFAULT_MAX_BYTES"]

log = logging.getLogger(__name__)

#: the media type of ``np.save`` bytes
NPY = "application/x-npy"
JSON = "application/json"
#: the largest request body read by default
DEFAULT_MAX_BYTES = 64 * 2**20
#: the number types a request may carry
DTYPES = {name: np.dtype(name) for name in
          ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")}
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


class PayloadError(QueryError):
    """A request the server refuses, with the HTTP status that says why (400, 413, 415, 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- payloads -------------------------------------------------------------------------------------------------
def _check_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.kind == "O" or dtype.hasobject:
        raise PayloadError(422, "object arrays are refused (they would need pickle): send numbers")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise PayloadError(422, f"arrays of {dtype} are refused: send numbers ({', '.join(DTYPES)})")
    native = dtype.newbyteorder("=")
    if native.name not in DTYPES:
        raise PayloadError(422, f"arrays of {dtype} are refused: send {', '.join(DTYPES)}")
    return native


def decode_npy(body: bytes | bytearray) -> np.ndarray:
    """The array in ``np.save`` bytes (format 1.0 or 2.0), never unpickling: the header is a literal, its type must
    be plain numbers, and the data exactly as long as the header's shape says. PayloadError (400, 422) if not."""
    buffer = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise PayloadError(400, f"npy format {version[0]}.{version[1]} is not read here (1.0 and 2.0 are)")
    except PayloadError:
        raise
    except Exception as exc:  # a bad magic string or header: numpy says ValueError, EOF or a literal's error
        raise PayloadError(400, f"the body is not npy bytes (np.save): {exc}") from None
    native = _check_dtype(dtype)
    count = math.prod(shape)
    data = memoryview(body)[buffer.tell():]
    if len(data) != count * dtype.itemsize:
        raise PayloadError(400, f"the npy body holds {len(data)} bytes of data where its header ({dtype}, shape "
                                f"{tuple(shape)}) says {count * dtype.itemsize}")
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")
    return array if dtype.isnative else array.astype(native)


def decode_json(body: bytes | bytearray) -> tuple[np.ndarray, bool]:
    """``(array, typed)`` from a JSON body ``{"inputs": nested lists, "dtype": optional}``: ``typed`` says a dtype
    was given (without one the numbers come as float64, for :func:`_prepare` to give the model its float type).
    PayloadError (400, 422) for anything else."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise PayloadError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise PayloadError(422, 'a JSON request is {"inputs": nested lists of numbers, "dtype": optional}')
    extra = sorted(set(doc) - {"inputs", "dtype"})
    if extra:
        raise PayloadError(422, f"unknown keys {extra} in the request (it takes 'inputs' and 'dtype')")
    name = doc.get("dtype")
    if name is not None and (not isinstance(name, str) or name not in DTYPES):
        raise PayloadError(422, f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    try:
        array = np.asarray(doc["inputs"])
    except (ValueError, RecursionError) as exc:  # ragged lists, too many dimensions
        raise PayloadError(422, f"inputs are not a rectangular array of numbers: {exc}") from None
    if array.dtype.kind not in "biuf":
        raise PayloadError(422, f"inputs must be numbers only (found {array.dtype.kind!r} values: strings, nulls, "
                                "objects or integers too large)")
    try:
        return array.astype(DTYPES[name or "float64"], casting="same_kind" if name else "unsafe"), name is not None
    except TypeError as exc:
        raise PayloadError(422, f"inputs cannot be {name}: {exc}") from None


def _prepare(model: Any, array: np.ndarray, typed: bool) -> Any:
    """What the model is called with: for a torch module a tensor, floats (and untyped JSON numbers) in its
    parameters' float type (float32 without one); for another callable the array (untyped numbers as float32)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        return array if typed else array.astype(np.float32)
    x = torch.from_numpy(array if array.flags.writeable else array.copy())
    want = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if not typed or (want is not None and x.is_floating_point()):
        x = x.to(want or torch.float32)
    return x


def _run(model: Any, x: Any) -> Any:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(x)
    return model(x)


def _as_array(value: Any) -> np.ndarray | None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)
    return None


def _plain(value: Any) -> Any:
    """A model's output as JSON values (non-finite numbers as null)."""
    array = _as_array(value)
    if array is not None:
        if array.dtype.kind not in "biuf":
            raise TypeError(f"the model returned an array of {array.dtype}, which has no JSON form")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            array = np.where(np.isfinite(array), array.astype(object), None)
        return array.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise TypeError(f"the model returned a {type(value).__name__}, which has no JSON form")


def _last_line(exc: BaseException, limit: int = 500) -> str:
    """An error's message for a client: its last line (TorchScript puts its traceback first), at most ``limit``."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1].strip() if lines else ""
    return text if len(text) <= limit else text[:limit] + "..."


# -- the app --------------------------------------------------------------------------------------------------
class _Answer:
    __slots__ = ("status", "body", "media", "headers")

    def __init__(self, status: int, body: bytes, media: str, headers: dict | None = None):
        self.status, self.body, self.media, self.headers = status, body, media, headers or {}


def _error(status: int, message: str, **extra: Any) -> _Answer:
    return _Answer(status, json.dumps({"error": message, "status": status, **extra}).encode(), JSON, None)


class _Service:
    """What the routes share: the follower, the pool the model runs in, the limits and the counters."""

    def __init__(self, followed: FollowedModel, max_bytes: int, max_batch: int | None, workers: int):
        self.followed, self.max_bytes, self.max_batch = followed, max_bytes, max_batch
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix=f"mlwarehouse serve {followed.spelling}")
        self.lock = threading.Lock()
        self.counts = {"answered": 0, "refused": 0, "failed": 0}
        self.started = utc_now()
        self.since = (followed.model_id, self.started)  # (model, since when it is served)
        chained = followed.on_swap

        def on_swap(old: str | None, new: str) -> None:
            self.since = (new, utc_now())
            if chained is not None:
                chained(old, new)

        followed.on_swap = on_swap

    def count(self, status: int) -> None:
        with self.lock:
            self.counts["answered" if status < 400 else "refused" if status < 500 else "failed"] += 1

    def predict(self, body: bytearray, media: str) -> _Answer:
        """Decode, run and encode one request (in the pool)."""
        try:
            array, typed = (decode_npy(body), True) if media == NPY else decode_json(body)
            if self.max_batch is not None and array.ndim and array.shape[0] > self.max_batch:
                raise PayloadError(413, f"a batch of {array.shape[0]} rows is over the limit of {self.max_batch}")
        except PayloadError as exc:
            return _error(exc.status, str(exc))
        try:
            model_id, version, model = self.followed.current()  # one read: the outputs, id and version agree
        except Exception as exc:  # a first load (preload=False) that failed
            return _error(503, f"no model to serve {self.followed.spelling}: {type(exc).__name__}: {exc}")
        headers = {"X-Model": str(model_id), "X-Alias-Version": str(version)}
        try:
            out = _run(model, _prepare(model, array, typed))
        except Exception as exc:
            log.warning("model %s (%s) raised on a request: %s", model_id, self.followed.spelling, exc)
            return _error(500, f"the model raised {type(exc).__name__}: {_last_line(exc)}", model=model_id,
                          version=version)
        try:
            if media == NPY:
                result = _as_array(out)
                if result is None or result.dtype.kind not in "biuf":
                    return _error(406, f"the model returned a {type(out).__name__}, which has no npy form: ask in "
                                       "JSON", model=model_id, version=version)
                buffer = io.BytesIO()
                np.save(buffer, result, allow_pickle=False)
                return _Answer(200, buffer.getvalue(), NPY, headers)
            doc = {"outputs": _plain(out), "model": model_id, "version": version}
            return _Answer(200, json.dumps(doc, allow_nan=False).encode(), JSON, headers)
        except (TypeError, ValueError) as exc:
            return _error(500, str(exc), model=model_id, version=version)

    def version(self) -> dict:
        followed = self.followed
        model_id, version, _ = followed.current(load=False)  # one read, never a load: id and version agree
        since_model, since = self.since
        error = followed.last_error
        with self.lock:
            counts = dict(self.counts)
        return {"spelling": followed.spelling, "model": model_id, "version": version, "swaps": followed.swaps,
                "since": since if since_model == model_id else utc_now(), "removed": followed.removed,
                "following": followed.following, "poll": followed.poll, "started": self.started,
                "last_error": None if error is None else f"{type(error).__name__}: {error}", **counts}


def _host_name(host: str) -> str:
    """A ``Host`` value without its port, lower-case (``[::1]:8080`` -> ``[::1]``), as the web UI's guard reads it
    (not imported from there: a loop does not import a front)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _HostCheck:
    """ASGI middleware: 400 for a ``Host`` not served (a DNS-rebinding page posting to a loopback server)."""

    def __init__(self, app, names: Iterable[str]):
        self.app = app
        names = list(names)
        self.any = "*" in names
        self.allowed = {_host_name(n) for n in names if n != "*"}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.any:
            host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
            if _host_name(host) not in self.allowed:
                from starlette.responses import JSONResponse
                response = JSONResponse({"error": f"host {host!r} is not served here (start the server with "
                                                  "--allow-host to serve another name)", "status": 400}, 400)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def make_app(followed: FollowedModel, *, max_bytes: int = DEFAULT_MAX_BYTES, max_batch: int | None = None,
             workers: int = 4, allowed_hosts: Iterable[str] | None = None):
    """The FastAPI app serving ``followed`` (see the module notes). ``allowed_hosts``: the ``Host`` names answered
    (None: any; :func:`serve` passes the loopback names and the bound address). The app does not close
    ``followed``; its thread pool ends with the app's lifespan."""
    try:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, Response
    except ImportError as exc:
        raise ConfigError("the model server needs its extra: pip install 'mlwarehouse[ui]'") from exc
    for name, value, least in (("max_bytes", max_bytes, 1), ("workers", workers, 1),
                               ("max_batch", 1 if max_batch is None else max_batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise QueryError(f"{name} must be an integer >= {least}, not {value!r}")
    service = _Service(followed, max_bytes, max_batch, workers)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.pool.shutdown(wait=True)

    app = FastAPI(title=f"mlwarehouse {followed.spelling}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    def answer(result: _Answer) -> Response:
        service.count(result.status)
        return Response(result.body, status_code=result.status, media_type=result.media, headers=result.headers)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in (JSON, NPY):
            return answer(_error(415, f"send {JSON} ({{\"inputs\": [...]}}) or {NPY} (np.save bytes), not "
                                      f"{media or 'no content type'}"))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > service.max_bytes:
            return answer(_error(413, f"the body of {declared} bytes is over the limit of {service.max_bytes}"))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > service.max_bytes:
                return answer(_error(413, f"the body is over the limit of {service.max_bytes} bytes"))
        loop = asyncio.get_running_loop()
        return answer(await loop.run_in_executor(service.pool, service.predict, body, media))

    @app.get("/health")
    async def health() -> Response:
        following = followed.following
        model_id, version, _ = followed.current(load=False)
        doc = {"status": "ok" if following else "stopped", "following": following, "model": model_id,
               "version": version, "removed": followed.removed}
        return JSONResponse(doc, status_code=200 if following else 503)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse(service.version())

    if allowed_hosts is not None:
        app.add_middleware(_HostCheck, names=list(allowed_hosts))
    return app


# -- running --------------------------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto TCP: asyncio sets TCP_NODELAY on
    # the accepted sockets only then (with proto 0, Nagle + delayed ACK add ~40 ms to every answer)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts
    except OSError:
        sock.close()
        raise
    return sock


def serve(project: Any, spelling: str, host: str = "127.0.0.1", port: int = 8080, poll: float = 0.5, *,
          max_bytes: int = DEFAULT_MAX_BYTES, max_batch: int | None = None, workers: int = 4,
          allowed_hosts: Iterable[str] | None = None, stop: threading.Event | None = None,
          graceful: float = 10.0) -> None:
    """Serve ``spelling`` (``"mlp@champion"``) of ``project`` (a project or a warehouse) over HTTP until SIGTERM or
    SIGINT (in the main thread) or ``stop`` is set; requests in flight get ``graceful`` seconds to finish, then the
    follower is closed. ``port`` 0 picks a free port (printed). Only bind to another host than 127.0.0.1 on a
    network you trust: the server has no authentication. NotFound if the alias points at no model."""
    try:
        import uvicorn
    except ImportError as exc:
        raise ConfigError("the model server needs its extra: pip install 'mlwarehouse[ui]'") from exc
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise QueryError(f"port must be an integer from 0 to 65535, not {port!r}")
    stop = stop or threading.Event()
    names = [*_LOOPBACK, *(allowed_hosts or ())]
    if host not in ("0.0.0.0", "::", ""):
        names.append(f"[{host}]" if ":" in host else host)
    followed = follow(project, spelling, poll=poll)
    done = threading.Event()
    sock = None
    try:
        app = make_app(followed, max_bytes=max_bytes, max_batch=max_batch, workers=workers, allowed_hosts=names)
        sock = _bind(host, port)
        bound = sock.getsockname()[1]
        config = uvicorn.Config(app, host=host, port=bound, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=graceful)
        server = uvicorn.Server(config)

        def watch() -> None:
            while not done.is_set():
                if stop.wait(0.1):
                    server.should_exit = True
                    return

        threading.Thread(target=watch, name="mlwarehouse serve stop", daemon=True).start()
        where = f"[{host}]" if ":" in host else host
        print(f"serving {spelling} (model {followed.model_id}, version {followed.version}) on "
              f"http://{where}:{bound}/predict; SIGTERM or Ctrl-C stops it", flush=True)
        if not stop.is_set():
            server.run(sockets=[sock])
    finally:
        done.set()
        followed.close()
        if sock is not None:
            sock.close()
    log.info("stopped serving %s (%s swaps)", spelling, followed.swaps)


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "python -m mlwarehouse.loops.server",
                                description=__doc__.split("\n")[0])
    p.add_argument("spelling", help="the model to serve, as name@alias (mlp@champion)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1; another one "
                                                         "exposes the unauthenticated server to its network)")
    p.add_argument("--port", type=int, default=8080, help="the port (default 8080; 0 picks a free one)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between reads of the alias (default 0.5)")
    p.add_argument("--project", help="the project (default: MLW_PROJECT, else default)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"the largest request body (default {DEFAULT_MAX_BYTES}); larger ones get 413")
    p.add_argument("--max-batch", type=int, help="the most rows in one request (default: no limit)")
    p.add_argument("--workers", type=int, default=4, help="threads running the model (default 4)")
    p.add_argument("--allow-host", action="append", help="a Host name served besides the loopback names and the "
                                                         "bound address (repeat it; '*' for any)")
    p.add_argument("--graceful", type=float, default=10.0,
                   help="seconds requests in flight get to finish at shutdown (default 10)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line entry: serves until SIGTERM or SIGINT, then returns 0 (1 for an alias that points at no
    model, a port taken, or another warehouse error, said in one line)."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, not {args.port}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn takes them while it runs and hands them back after
        signal.signal(sig, lambda *_: stop.set())
    import mlwarehouse
    try:
        with mlwarehouse.connect(project=args.project) as wh:
            serve(wh, args.spelling, host=args.host, port=args.port, poll=args.poll, max_bytes=args.max_bytes,
                  max_batch=args.max_batch, workers=args.workers, allowed_hosts=args.allow_host, stop=stop,
                  graceful=args.graceful)
    except (WarehouseError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
