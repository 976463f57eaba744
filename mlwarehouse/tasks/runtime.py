"""What runs inside a task's own process: ``python -m mlwarehouse.tasks.runtime SPEC.json``.

A worker starts one such process per task attempt, in a new session, with stdout and stderr piped to it and the
warehouse named by ``MLW_URI`` / ``MLW_BLOBS`` / ``MLW_PROJECT``: a fresh interpreter (cold), or a fork of the
worker's fork server (warm, :mod:`mlwarehouse.tasks.forkserver`), which calls :func:`main` the same way. This
process:

1. connects to the warehouse and starts a run for the task (its id is recorded on the task), so the logs and
   models the task saves link back to it (task -> run -> model -> dataset);
2. makes :func:`mlwarehouse.current_task` return the task's id, name, hyper-parameters, run and attempt;
3. runs the script: a file's source (read from the blob store and checked against its sha256) is executed in a
   fresh namespace whose globals are the hyper-parameters plus ``__name__ = "__main__"``, as TensorHub scripts
   expect; a ``"module:function"`` target is imported and called with the hyper-parameters as keyword arguments;
4. reads the saved result keys from the namespace (or the function's return value), checks they can be stored,
   and writes the outcome as JSON to the result file the worker named; the worker records it.

It exits by itself if its parent (the worker, or the fork server) dies: it checks every half second, so a killed
worker leaves no task process behind.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import json
import linecache
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from mlwarehouse import schema
from mlwarehouse.context import TaskContext, current_task, set_current_task
from mlwarehouse.errors import InvalidDocument
from mlwarehouse.query.fields import normalize_value

__all__ = ["main", "execute", "Ahead", "watch_parent", "ScriptError", "TaskContext", "current_task"]


class ScriptError(Exception):
    """A problem with the task itself (bad script, missing or unstorable result): retrying cannot help."""


class _Terminated(BaseException):
    """The worker asked this process to stop (SIGTERM)."""


def _on_sigterm(signum, frame):
    raise _Terminated("terminated by the worker")


_watched: tuple[int, int] | None = None  # (this process, the parent its watcher thread watches)


def watch_parent(parent: int) -> None:
    """Start a thread that takes this process's whole session down if ``parent`` dies (once per parent: a
    fork server's spare starts it before its task is known)."""
    global _watched
    if _watched == (os.getpid(), parent):  # a fork has no threads: a copied value is not this process's
        return
    _watched = (os.getpid(), parent)

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:  # the worker died: take our whole session down with us
                try:
                    os.killpg(os.getpgrp(), signal.SIGKILL)
                finally:
                    os._exit(137)
    threading.Thread(target=watch, name="mlw-parent-watch", daemon=True).start()


def _user_traceback(exc: BaseException) -> str:
    """The traceback without this module's own frames, so it starts in the user's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _load_source(project, script: dict) -> tuple[str, str]:
    source = bytes(project.unpack(script["source"]))
    if hashlib.sha256(source).hexdigest() != script.get("sha256"):
        raise ScriptError(f"task script {script.get('filename')!r}: stored source does not match its sha256")
    return source.decode("utf-8"), script.get("filename") or "task.py"


def _resolve(target: str):
    module_name, _, name = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            raise ScriptError(f"task target {target!r}: module {module_name!r} cannot be imported on this "
                              f"worker ({exc})") from exc
        raise
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ScriptError(f"task target {target!r}: {module_name!r} has no attribute {name!r}") from None
    if not callable(obj):
        raise ScriptError(f"task target {target!r} is not callable")
    return obj


def _results(values: dict, keys: list[str], where: str) -> dict:
    out = {}
    for key in keys:
        if key not in values:
            raise ScriptError(f"result key {key!r} was never set by {where}")
        try:
            out[key] = normalize_value(values[key], f"result {key!r}")
        except InvalidDocument as exc:
            raise ScriptError(f"{exc} (set by {where}); results must be JSON values: numbers, strings, lists, "
                              f"dicts; save arrays and models to the warehouse instead") from None
    return out


def execute(project, task: dict) -> dict:
    """Run the task's script in this process and return its normalised results."""
    script = task.get("script")
    hyper = dict(task.get("hyper_parameters") or {})
    keys = list(task.get("saved_result_keys") or [])
    if not script:
        raise ScriptError("the task has no script: create it with a file path or 'module:function'")
    if script.get("kind") == "file":
        source, filename = _load_source(project, script)
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show lines
        code = compile(source, filename, "exec")
        namespace = {**hyper, "__name__": "__main__", "__file__": filename, "__builtins__": builtins}
        sys.argv = [filename]
        try:
            exec(code, namespace)
        except SystemExit as exc:  # sys.exit() ends a script; only a non-zero status is a failure
            if exc.code not in (None, 0):
                raise RuntimeError(f"the script called sys.exit({exc.code!r})") from exc
        return _results(namespace, keys, f"the script {filename!r}")
    if script.get("kind") == "callable":
        target = script["target"]
        try:
            value = _resolve(target)(**hyper)
        except SystemExit as exc:  # as for scripts: sys.exit(0) ends the call, a non-zero status fails it
            if exc.code not in (None, 0):
                raise RuntimeError(f"{target!r} called sys.exit({exc.code!r})") from exc
            value = None
        where = f"the return value of {target!r}"
        if isinstance(value, dict):
            return _results(value, keys or [k for k in value if isinstance(k, str)], where)
        if len(keys) == 1:
            return _results({keys[0]: value}, keys, where)
        if keys:
            raise ScriptError(f"{target!r} returned a {type(value).__name__}, not a dict holding the result keys "
                              f"{keys}")
        return {} if value is None else _results({"return": value}, ["return"], where)
    raise ScriptError(f"unknown script kind {script.get('kind')!r}")


def _write(path: str, outcome: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(outcome, f)
    os.replace(tmp, path)


class Ahead:
    """A warehouse connection opened before the task is known: a fork server's spare process opens it while the
    worker's previous task runs, so connecting (and ensuring the run's collections) is off the task's clock.
    :meth:`take` hands it to :func:`main` if it is still fresh and was opened in the task's working directory
    (a relative URI means the same place there); otherwise it is closed and ``main`` connects itself."""

    #: seconds after which a connection opened ahead is not used (a server may have dropped an idle one)
    MAX_AGE = 30.0

    def __init__(self):
        from mlwarehouse.warehouse import connect
        self.cwd, self.opened = os.getcwd(), time.monotonic()
        self.warehouse = connect()  # the worker's URIs and project, from the environment it gave the server
        try:
            project = self.warehouse.project()
            for collection in (schema.RUNS, schema.LOGS, schema.LINEAGE, schema.LINEAGE_DELETED):
                project.ensure(collection)  # what the run and its lineage write to, checked once here
        except BaseException:
            self.warehouse.close()
            raise

    @classmethod
    def open(cls) -> "Ahead | None":
        """One opened now, or None if that failed (``main`` connects itself, and reports the error then)."""
        try:
            return cls()
        except Exception:
            return None

    def take(self, cwd: str):
        """The warehouse, for the task that runs in ``cwd`` (None: too old, or opened elsewhere; closed then)."""
        if cwd == self.cwd and time.monotonic() - self.opened < self.MAX_AGE:
            return self.warehouse
        try:
            self.warehouse.close()
        except Exception:
            pass
        return None


def _release_output() -> None:
    """Point stdout and stderr at /dev/null once the result is written: the worker's end of the output pipe
    reads end-of-file now, so it records the task without waiting for this process to be torn down (it kills
    the session after that); a thread the script left running writes nowhere from here on."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
    finally:
        os.close(null)


def main(argv: list[str] | None = None, *, spec: dict | None = None, warehouse=None) -> int:
    """Run the task that ``spec`` (or the JSON file ``argv[0]``) describes, in ``warehouse`` if given (opened
    ahead, see :class:`Ahead`; it is closed at the end); 0 if it succeeded."""
    if spec is None:
        argv = sys.argv[1:] if argv is None else argv
        with open(argv[0], encoding="utf-8") as f:
            spec = json.load(f)
    watch_parent(spec["parent_pid"])
    signal.signal(signal.SIGTERM, _on_sigterm)

    from mlwarehouse.warehouse import connect

    task, worker = spec["task"], spec["worker"]
    outcome: dict = {"ok": False, "retry": True, "error": "the task process stopped before running the script"}
    wh = warehouse if warehouse is not None else connect(project=spec["project"])
    try:
        project = wh.project(spec["project"])
        run = project.runs.start(name=task["task_name"], task=task["_id"],
                                 hyper_parameters=task.get("hyper_parameters") or {})
        outcome["run"] = run.id
        run_path = spec.get("run_path") or os.path.join(os.path.dirname(spec["result_path"]), "run.id")
        with open(run_path, "w", encoding="utf-8") as f:
            f.write(run.id)  # the worker closes this run if the process dies before writing its result
        project.tasks.set_run(task["_id"], worker, run.id, lease=task.get("lease"))
        set_current_task(TaskContext(id=task["_id"], task_name=task["task_name"],
                                      hyper_parameters=dict(task.get("hyper_parameters") or {}), run=run.id,
                                      attempt=task.get("attempts", 1), project=project.name, worker=worker))
        try:
            result = execute(project, task)
        except BaseException as exc:  # SystemExit from a thread's hook, KeyboardInterrupt, SIGTERM: all fail
            error = str(exc) if isinstance(exc, ScriptError) else _user_traceback(exc)
            outcome.update(error=error, retry=not isinstance(exc, ScriptError))
            run.fail(error)
        else:
            outcome = {"ok": True, "result": result, "run": run.id}
            run.finish()
    except BaseException as exc:  # the warehouse or the run could not be set up or closed
        outcome.update(ok=False, error=_user_traceback(exc), retry=True)
    finally:
        set_current_task(None)
        sys.stdout.flush()
        sys.stderr.flush()
        _write(spec["result_path"], outcome)
        try:
            wh.close()
        except BaseException:
            traceback.print_exc()  # into the task's output, still open
            raise
        finally:
            _release_output()
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":  # run the imported module, so current_task() sees what main() sets
    from mlwarehouse.tasks.runtime import main as _main
    _code = _main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code)  # the result is written: threads the script left running must not keep the task open
