import os
import pickle
import sys

import numpy as np
import pytest
import torch
from conftest import stand_in_modules

from engine.io.unpickle import PickleStub, UnsafePickleError, safe_load

LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


class ModelCheckpoint:
    """Pickled under Lightning's module name, as Lightning callbacks are in a taming ``last.ckpt``."""

    __module__ = LIGHTNING_MODULE

    def __init__(self, monitor: str, best_score: float) -> None:
        self.monitor, self.best_model_score = monitor, np.float64(best_score)


def fake_lightning():
    """Make ModelCheckpoint picklable by registering stand-in modules, only while saving."""
    names = [".".join(LIGHTNING_MODULE.split(".")[:i]) for i in range(1, 4)]
    return stand_in_modules({name: {"ModelCheckpoint": ModelCheckpoint} if name == LIGHTNING_MODULE else {}
                             for name in names})


def save_lightning_ckpt(path, state_dict: dict, **extra) -> None:
    """A Lightning-style checkpoint: the weights plus bookkeeping that weights_only=True refuses."""
    with fake_lightning():
        torch.save({"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": state_dict,
                    "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
                    "hparams": ModelCheckpoint("val/rec_loss", 0.25), **extra}, path)


class RunsShell:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


class Arbitrary:
    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("zip_format", [True, False])
def test_plain_tensor_dict_loads(tmp_path, zip_format):
    data = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int32), "h": torch.ones(2, dtype=torch.bfloat16),
            "nested": [{"t": torch.zeros(1)}, (1, 2.5, "s", None, b"raw", {3})], "size": torch.Size([2, 3])}
    path = tmp_path / "plain.pt"
    torch.save(data, path, _use_new_zipfile_serialization=zip_format)
    loaded = safe_load(path)
    assert loaded.keys() == data.keys() and loaded["nested"][1] == data["nested"][1]
    for key in ("w", "b", "h"):
        assert loaded[key].dtype == data[key].dtype and torch.equal(loaded[key], data[key])
    assert loaded["size"] == torch.Size([2, 3])


@pytest.mark.parametrize("zip_format", [True, False])
def test_shell_command_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": RunsShell(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle .*evil\.pt.*\bposix\.system\b"):
        safe_load(path)
    assert not marker.exists()
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)


@pytest.mark.parametrize(("obj", "name"), [(CallsEval(), "builtins.eval"), (Arbitrary(), "Arbitrary")])
def test_other_globals_are_refused_by_name(tmp_path, obj, name):
    torch.save({"x": obj}, tmp_path / "bad.pt")
    with pytest.raises(UnsafePickleError, match=name):
        safe_load(tmp_path / "bad.pt")


def test_lightning_bookkeeping_becomes_inert_stubs(tmp_path):
    weights = {"encoder.w": torch.randn(2, 2)}
    save_lightning_ckpt(tmp_path / "last.ckpt", weights)
    assert LIGHTNING_MODULE not in sys.modules and "pytorch_lightning" not in sys.modules
    ckpt = safe_load(tmp_path / "last.ckpt")
    assert "pytorch_lightning" not in sys.modules  # nothing was imported
    assert (ckpt["epoch"], ckpt["global_step"]) == (3, 1234)
    assert torch.equal(ckpt["state_dict"]["encoder.w"], weights["encoder.w"])
    (callback, state), = ckpt["callbacks"].items()
    assert issubclass(callback, PickleStub) and f"{callback.__module__}.{callback.__qualname__}" == \
        f"{LIGHTNING_MODULE}.ModelCheckpoint"
    assert torch.equal(state["best_model_score"], torch.tensor(0.5))
    hparams = ckpt["hparams"]
    assert isinstance(hparams, callback) and hparams.state["monitor"] == "val/rec_loss"
    assert isinstance(hparams.state["best_model_score"], PickleStub)  # a numpy scalar, absorbed


def test_not_a_torch_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00not a pickle at all")
    with pytest.raises(pickle.UnpicklingError, match="not a readable torch.save file"):
        safe_load(tmp_path / "junk.pt")
