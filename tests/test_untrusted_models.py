"""Untrusted model documents: loading with ``allow_pickle=False`` never runs code the store chose.

Each payload here would leave a marker file if it ran; every test asserts the marker is absent.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import textwrap
import uuid
import warnings
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from mlwarehouse.codecs import imports  # noqa: E402
from mlwarehouse.errors import CodecError, PickleNotAllowed  # noqa: E402
from mlwarehouse.models import torch_io  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _exported(net: nn.Module) -> bytes:
    return torch_io.describe(net, example_inputs=(torch.randn(4, 8),), formats=["export"]).payload


class _Touch:
    """Unpickling it creates ``path``: the stand-in for an attacker's code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_inputs(marker) -> bytes:
    buf = io.BytesIO()
    torch.save(((torch.zeros(2, 8),), {}, _Touch(marker)), buf)  # weights_only=True refuses it, pickle runs it
    return buf.getvalue()


def _rebuild(data: bytes, entry) -> bytes:
    """``data``'s entries through ``entry(name, bytes) -> [(name, bytes), ...]``, in order, duplicates allowed."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as dst:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        for name in src.namelist():
            for new_name, content in entry(name, src.read(name)):
                dst.writestr(new_name, content)
    return out.getvalue()


def _duplicate_inputs(data: bytes, marker) -> bytes:
    """The sample inputs twice: the attacker's first (torch's reader takes it), the genuine copy last (zipfile's)."""
    return _rebuild(data, lambda n, c: [(n, _evil_inputs(marker)), (n, c)] if "sample_inputs" in n else [(n, c)])


def test_duplicate_entries_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    net = _net()
    crafted = _duplicate_inputs(_exported(net), marker)
    with pytest.raises(PickleNotAllowed, match="more than once"):
        torch_io.check_pt2(crafted)
    with pytest.raises(PickleNotAllowed, match="more than once"):
        torch_io.build(torch_io.Architecture("export", crafted), torch_io.state_dict_of(net))
    assert not marker.exists()


def test_sample_inputs_that_need_the_pickle_fallback_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    net = _net()
    crafted = _rebuild(_exported(net), lambda n, c: [(n, _evil_inputs(marker) if "sample_inputs" in n else c)])
    with pytest.raises(PickleNotAllowed, match="sample inputs that need pickle"):
        torch_io.build(torch_io.Architecture("export", crafted), torch_io.state_dict_of(net))
    assert not marker.exists()


def test_torch_reads_only_the_checked_copy_and_never_unpickles(monkeypatch):
    net = _net()
    data = _exported(net)
    checked = torch_io.check_pt2(data)
    assert checked != data and zipfile.ZipFile(io.BytesIO(checked)).namelist() == \
        zipfile.ZipFile(io.BytesIO(data)).namelist()

    real_load, calls = torch.load, []

    def weights_only_load(*args, weights_only=None, **kwargs):
        calls.append(weights_only)
        if weights_only is not True:  # the fallback in torch's deserializer: torch.load(weights_only=False)
            raise AssertionError("torch unpickled part of an archive")
        return real_load(*args, weights_only=True, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("torch unpickled part of an archive")

    monkeypatch.setattr(torch, "load", weights_only_load)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = torch_io.build(torch_io.Architecture("export", data), torch_io.state_dict_of(net))
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x), net.eval()(x))
    assert calls == [True]  # the check's own weights_only load; torch itself loaded nothing


@pytest.mark.parametrize("edit", ["deflated", "bad json", "config list", "two roots"])
def test_malformed_archives_raise_codec_errors(edit):
    data = _exported(_net())
    if edit == "deflated":
        src = zipfile.ZipFile(io.BytesIO(data))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
            for name in src.namelist():
                dst.writestr(name, src.read(name))
        crafted = out.getvalue()
    elif edit == "bad json":
        crafted = _rebuild(data, lambda n, c: [(n, b"[" * 100_000 if n.endswith("model.json") else c)])
    elif edit == "config list":
        crafted = _rebuild(data, lambda n, c: [(n, b"[1]" if n.endswith("_weights_config.json") else c)])
    else:
        crafted = _rebuild(data, lambda n, c: [(n, c), ("other/" + n.split("/", 1)[1], c)]
                           if n.endswith("byteorder") else [(n, c)])
    with pytest.raises(CodecError) as info:
        torch_io.build(torch_io.Architecture("export", crafted), {})
    assert type(info.value) in (CodecError, PickleNotAllowed)


def test_a_tampered_archive_in_the_warehouse_is_refused(wh, tmp_path):
    marker = tmp_path / "pwned"
    p = wh.project("shared")
    net = _net()
    rec = p.models.save(net, "victim", example_inputs=(torch.randn(2, 8),))
    crafted = _duplicate_inputs(p.unpack(rec.architecture["archive"]), marker)
    p.update("models", {"_id": rec.id}, {"$set": {"architecture.archive": p.pack(crafted)}})
    with pytest.raises(PickleNotAllowed):
        p.models.load("victim")
    assert not marker.exists()


# -- class models ----------------------------------------------------------------------------------------------

def _module_file(folder, marker, name=None) -> str:
    """A module whose import appends to ``marker``, holding an importable nn.Module ``Net``."""
    name = name or f"mlw_test_mod_{uuid.uuid4().hex[:10]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(f"""\
        import torch
        with open({str(marker)!r}, "a") as f:
            f.write("imported\\n")

        class Net(torch.nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.config = {{"width": width}}
                self.lin = torch.nn.Linear(width, 2)

            def forward(self, x):
                return self.lin(x)
        """))
    return name


def test_a_class_from_a_module_not_trusted_is_refused_before_import(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    name = _module_file(tmp_path / "mods", marker)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setattr(imports, "_trusted", set())
    monkeypatch.setenv(torch_io.TRUSTED_MODULES_ENV, f"{name}x, other.{name}")  # neither covers the module
    arch = torch_io.Architecture("class", target=f"{name}:Net", config={"width": 4})
    with pytest.raises(PickleNotAllowed, match="not trusted"):
        torch_io.build(arch, {})
    assert not marker.exists() and name not in sys.modules
    with pytest.raises(PickleNotAllowed, match="not trusted"):  # a submodule of an untrusted one is untrusted too
        torch_io.build(torch_io.Architecture("class", target=f"{name}.sub:Net", config={}), {})
    assert not marker.exists()

    monkeypatch.setenv(torch_io.TRUSTED_MODULES_ENV, name)  # now the user trusts it
    weights = {"lin.weight": torch.ones(2, 4), "lin.bias": torch.zeros(2)}
    model = torch_io.build(arch, weights)
    assert marker.read_text() == "imported\n"
    assert torch.equal(model(torch.ones(1, 4)), torch.full((1, 2), 4.0))
    monkeypatch.delitem(sys.modules, name)


def test_trust_modules_covers_submodules_and_checks_names(monkeypatch):
    monkeypatch.setattr(imports, "_trusted", set())
    monkeypatch.delenv(torch_io.TRUSTED_MODULES_ENV, raising=False)
    torch_io.trust_modules("mypkg.nets")
    assert imports.is_trusted("mypkg.nets") and imports.is_trusted("mypkg.nets.conv")
    assert not imports.is_trusted("mypkg") and not imports.is_trusted("mypkg.netsx")
    with pytest.raises(CodecError, match="not a module name"):
        torch_io.trust_modules("../evil")


def test_a_class_model_loads_in_a_fresh_process_only_when_trusted(wh, subprocess_env, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    mods = tmp_path / "mods"
    name = _module_file(mods, marker)
    monkeypatch.syspath_prepend(str(mods))
    module = __import__(name)
    net = module.Net(4)
    p = wh.project("classes")
    rec = p.models.save(net, "by-class", config={"width": 4}, arch="class")
    assert rec.architecture["class"] == f"{name}:Net"
    assert torch.equal(p.models.load("by-class")(torch.ones(1, 4)), net(torch.ones(1, 4)))  # saved here: trusted
    np.save(tmp_path / "x.npy", np.ones((3, 4), np.float32))
    code = (
        "import sys, numpy as np, torch, mlwarehouse\n"
        "from mlwarehouse.errors import PickleNotAllowed\n"
        "p = mlwarehouse.connect().project('classes')\n"
        "try:\n"
        "    model = p.models.load('by-class')\n"
        "except PickleNotAllowed as exc:\n"
        f"    assert {name!r} not in sys.modules\n"
        "    print('refused', exc)\n"
        "else:\n"
        f"    x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"    np.save({str(tmp_path / 'y.npy')!r}, model(x).detach().numpy())\n"
        "    print('loaded')\n")
    env = dict(subprocess_env, PYTHONPATH=str(mods) + ":" + subprocess_env["PYTHONPATH"])
    env.pop(torch_io.TRUSTED_MODULES_ENV, None)
    marker.write_text("")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused") and torch_io.TRUSTED_MODULES_ENV in done.stdout
    assert marker.read_text() == ""  # the module was never imported
    env[torch_io.TRUSTED_MODULES_ENV] = name
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loaded"
    assert np.array_equal(np.load(tmp_path / "y.npy"), net(torch.ones(3, 4)).detach().numpy())
