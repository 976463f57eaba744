"""torch_io: architectures without pickle, and the checks that keep torch.export.load from running code."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from mlwarehouse.errors import CodecError, PickleNotAllowed  # noqa: E402
from mlwarehouse.models import torch_io  # noqa: E402


class Net(nn.Module):
    """Importable, configurable, with a buffer, dropout and batch norm (train and eval differ)."""

    def __init__(self, n_in: int = 8, n_hidden: int = 16, n_out: int = 3):
        super().__init__()
        self.config = {"n_in": n_in, "n_hidden": n_hidden, "n_out": n_out}
        self.body = nn.Sequential(nn.Linear(n_in, n_hidden), nn.BatchNorm1d(n_hidden), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(n_hidden, n_out))

    def forward(self, x):
        return self.body(x)


def _trained_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 8))  # moves the batch-norm statistics away from their defaults
    return net


def _roundtrip(net, **kwargs):
    arch = torch_io.describe(net, **kwargs)
    return arch, torch_io.build(arch, torch_io.state_dict_of(net))


@pytest.mark.parametrize("fmt", ["export", "script", "class"])
def test_each_format_rebuilds_the_eval_model(fmt):
    net = _trained_net()
    arch, loaded = _roundtrip(net, example_inputs=(torch.randn(4, 8),), formats=[fmt])
    assert arch.format == fmt
    assert net.training  # saving does not change the caller's mode
    x = torch.randn(7, 8)  # another batch size than the example: the batch dimension is dynamic
    net.eval()
    assert torch.equal(loaded(x), net(x))
    assert not loaded.training


def test_archives_hold_no_weights_and_repeat_exactly():
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    weight_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    first = torch_io.describe(net, example_inputs=(torch.randn(2, 256),))
    assert first.format == "export" and len(first.payload) < weight_bytes / 4
    with torch.no_grad():
        net[0].weight.add_(1.0)  # a training step: same architecture, other weights
    torch_io._cache.clear()
    again = torch_io.describe(net, example_inputs=(torch.randn(2, 256),))
    assert again.payload == first.payload  # one architecture blob for every epoch


class Unscriptable(nn.Module):
    """Not scriptable (a Python-only call in forward) and without a config for its required argument."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return self.lin(x) * float(np.float32(1.0).item())


def test_describe_falls_back_and_explains():
    with pytest.raises(PickleNotAllowed, match="export: needs example_inputs.*script:.*class:.*needs.*width"):
        torch_io.describe(Unscriptable(4))
    model = Unscriptable(4)
    arch = torch_io.describe(model, allow_pickle=True)
    assert arch.format == "pickle"
    with pytest.raises(PickleNotAllowed):
        torch_io.build(arch, torch_io.state_dict_of(model))
    x = torch.randn(2, 4)
    assert torch.equal(torch_io.build(arch, torch_io.state_dict_of(model), allow_pickle=True)(x), model(x))
    assert torch_io.describe(model, config={"width": 4}).format == "class"
    with pytest.raises(CodecError, match="unknown architecture format"):
        torch_io.describe(model, formats=["onnx"])


def test_class_format_refuses_what_is_not_a_module(monkeypatch):
    arch = torch_io.Architecture("class", target="os:system", config={"command": "echo hacked"})
    with pytest.raises(PickleNotAllowed, match="not trusted"):  # os is not on the allow-list
        torch_io.build(arch, {})
    monkeypatch.setenv(torch_io.TRUSTED_MODULES_ENV, "os, no_such_module_xyz")
    with pytest.raises(CodecError, match="not an nn.Module"):  # trusted, but still never called
        torch_io.build(arch, {})
    with pytest.raises(CodecError, match="not importable"):
        torch_io.build(torch_io.Architecture("class", target="no_such_module_xyz:Net", config={}), {})


def test_weights_that_do_not_fit_raise():
    net = Net()
    arch = torch_io.describe(net, formats=["script"])
    with pytest.raises(CodecError, match="do not fit"):
        torch_io.build(arch, {"body.0.weight": torch.zeros(16, 8)})


# -- crafted archives ----------------------------------------------------------------------------------------

def _exported() -> bytes:
    return torch_io.describe(_trained_net(), example_inputs=(torch.randn(4, 8),), formats=["export"]).payload


def _rewrite(data: bytes, edit) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            content = edit(name, src.read(name))
            if content is not None:
                dst.writestr(name, content)
        extra = edit("<new>", b"")
        if extra:
            dst.writestr(*extra)
    return out.getvalue()


def _pickled_weights(name, content):
    if name.endswith("_weights_config.json"):
        config = json.loads(content)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config)
    return None if name == "<new>" else content


def _evil_target(name, content):
    if name.endswith("models/model.json"):
        return content.replace(b"torch.ops.aten.linear.default", b"torch.os.system", 1)
    return None if name == "<new>" else content


def _evil_expr(name, content):
    if name.endswith("models/model.json"):
        return content.replace(b"Symbol(", b"__import__('os').system('true') or Symbol(", 1)
    return None if name == "<new>" else content


def _extra_library(name, content):
    if name == "<new>":
        return ("archive/data/aotinductor/model/model.so", b"\x7fELF")
    return content


def _pickled_inputs(name, content):
    if name.endswith(".pt") and "sample_inputs" in name:
        buf = io.BytesIO()
        torch.save({"x": np.arange(3)}, buf)  # numpy arrays need the full unpickler
        return buf.getvalue()
    return None if name == "<new>" else content


@pytest.mark.parametrize("edit", [_pickled_weights, _evil_target, _evil_expr, _extra_library, _pickled_inputs])
def test_crafted_archives_are_refused_before_torch_reads_them(edit):
    data = _exported()
    torch_io.check_pt2(data)  # the genuine archive passes
    crafted = _rewrite(data, edit)
    with pytest.raises(PickleNotAllowed, match="allow_pickle=True"):
        torch_io.check_pt2(crafted)
    with pytest.raises(PickleNotAllowed):
        torch_io.build(torch_io.Architecture("export", crafted), {})


def test_not_an_archive():
    with pytest.raises(CodecError, match="not a .pt2 archive"):
        torch_io.check_pt2(b"definitely not a zip file")


def test_module_runs_in_a_process_that_never_defined_it(wh, subprocess_env, tmp_path):
    net = _trained_net().eval()
    x = torch.randn(5, 8)
    expected = net(x).detach().numpy()
    p = wh.project("transfer")
    p.models.save(net, "exported", example_inputs=(x[:2],))
    p.models.save(net, "scripted", arch="script")
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys, numpy as np, torch, mlwarehouse\n"
        "p = mlwarehouse.connect().project('transfer')\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "for name in ('exported', 'scripted'):\n"
        "    rec = p.models.find(name=name)[0]\n"
        "    model = rec.load()\n"
        "    assert 'test_torch_io' not in sys.modules\n"
        f"    np.save({str(tmp_path)!r} + '/' + name + '.npy', model(x).detach().numpy())\n"
        "    print(name, rec.architecture['format'])\n")
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exported export" in done.stdout and "scripted script" in done.stdout
    for name in ("exported", "scripted"):
        assert np.array_equal(np.load(tmp_path / f"{name}.npy"), expected)
