"""The attention autotuner (``kernels.triton.tuning``): candidates timed once per shape, the fastest kept on disk.

Driven on a CPU: a stand-in for a CUDA tensor reaches the GPU branch, and ``triton.testing.do_bench`` is replaced by
a clock that reads each candidate's time from a table, so the choice is known in advance. That the candidates
compile cleanly is the static gate's test (``test_gpu_static.py``); that they compute the right thing,
``test_triton_attention.py::test_every_tile_candidate``.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the interpreter tests need it set before the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from kernels.triton import tuning  # noqa: E402
from kernels.triton.tuning import Tiles  # noqa: E402

KEY = (90, "16-bit", False)
DEFAULT = tuning.DEFAULTS[KEY][0]
FAST, SLOW = Tiles(128, 64, 8, 2), Tiles(32, 32, 4, 1)


class FakeCudaTensor:
    is_cuda = True
    shape = (2, 8, 1280, 64)
    dtype = torch.bfloat16
    device = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A fake GPU whose kernels take ``times[tiles]`` ms; returns (times, launches, cache file)."""
    times = {DEFAULT: 0.30, FAST: 0.20, SLOW: 0.50}
    launches: list[Tiles] = []
    cache = tmp_path / "tiles.json"
    monkeypatch.setenv("DALLE_ENGINE_TILE_CACHE", str(cache))
    monkeypatch.delenv("DALLE_ENGINE_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "_caches", {})
    monkeypatch.setitem(tuning.ALTERNATIVES, KEY, ((FAST, SLOW), (), ()))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def do_bench(fn, return_mode="mean"):
        fn()
        return times[launches[-1]]

    monkeypatch.setattr(tuning.triton.testing, "do_bench", do_bench)
    return times, launches, cache


def choose(launches: list[Tiles], launch=None) -> Tiles:
    return tuning.choose("fwd", KEY, FakeCudaTensor(), "axial_row|seq1280", launch or launches.append)


def test_the_fastest_candidate_is_chosen_and_kept_on_disk(gpu, monkeypatch):
    times, launches, cache = gpu
    assert choose(launches) == FAST
    assert launches == [DEFAULT, FAST, SLOW]  # each timed once, the default first
    (name, entry), = json.loads(cache.read_text())["entries"].items()
    assert "Fake GPU" in name and "|fwd|bfloat16|16-bit|d64|bh16|axial_row|seq1280" in name
    assert Tiles(**entry["tiles"]) == FAST and entry["ms"] == {str(t): times[t] for t in (DEFAULT, FAST, SLOW)}

    assert choose(launches) == FAST and len(launches) == 3  # remembered in this process
    monkeypatch.setattr(tuning, "_caches", {})  # a new process reads the file: no timing either
    assert choose(launches) == FAST and len(launches) == 3


def test_each_shape_is_timed_on_its_own(gpu):
    _, launches, cache = gpu
    choose(launches)
    tuning.choose("fwd", KEY, FakeCudaTensor(), "conv_like|seq1280", launches.append)
    assert len(launches) == 6 and len(json.loads(cache.read_text())["entries"]) == 2


def test_a_candidate_that_cannot_run_here_is_skipped(gpu):
    _, launches, cache = gpu

    def launch(tiles):
        if tiles == FAST:  # e.g. more shared memory than this GPU has
            raise RuntimeError("out of resource: shared memory, Required: 180000, Hardware limit: 101376")
        launches.append(tiles)

    assert choose(launches, launch) == DEFAULT
    entry = next(iter(json.loads(cache.read_text())["entries"].values()))
    assert entry["ms"][str(FAST)].startswith("RuntimeError: out of resource")


def test_when_no_candidate_runs_the_first_error_reaches_the_fallback(gpu):
    _, launches, cache = gpu

    def launch(tiles):
        raise RuntimeError(f"cannot launch {tiles}")

    with pytest.raises(RuntimeError, match=f"cannot launch {DEFAULT}"):
        choose(launches, launch)
    assert not cache.exists()


def test_a_stored_choice_no_longer_among_the_candidates_is_timed_again(gpu, monkeypatch):
    _, launches, cache = gpu
    choose(launches)
    monkeypatch.setitem(tuning.ALTERNATIVES, KEY, ((SLOW,), (), ()))  # a newer table dropped FAST
    monkeypatch.setattr(tuning, "_caches", {})
    assert choose(launches) == DEFAULT and len(launches) == 5


def test_autotune_off_launches_the_defaults_and_writes_nothing(gpu, monkeypatch):
    _, launches, cache = gpu
    choose(launches)  # a stored choice is ignored too: the defaults are what repeats everywhere
    monkeypatch.setenv("DALLE_ENGINE_AUTOTUNE", "0")
    assert choose(launches) == DEFAULT and len(launches) == 3
    cache.unlink()
    assert choose(launches) == DEFAULT and not cache.exists()


def test_no_timing_while_a_cuda_graph_is_captured(gpu, monkeypatch):
    _, launches, cache = gpu
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choose(launches) == DEFAULT and not launches and not cache.exists()


def test_a_damaged_cache_file_is_ignored_then_replaced(gpu):
    _, launches, cache = gpu
    cache.write_text('{"version": 1, "entries": [')
    with pytest.warns(UserWarning, match="ignoring the attention tile cache"):
        assert choose(launches) == FAST
    assert Tiles(**next(iter(json.loads(cache.read_text())["entries"].values()))["tiles"]) == FAST


def test_other_processes_choices_are_kept_when_writing(gpu, monkeypatch):
    _, launches, cache = gpu
    choose(launches)  # this process has read the file
    other = json.loads(cache.read_text())
    other["entries"]["another shape"] = {"tiles": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}}
    cache.write_text(json.dumps(other))
    tuning.choose("fwd", KEY, FakeCudaTensor(), "full|seq1280", launches.append)
    assert {"another shape"} < set(json.loads(cache.read_text())["entries"])


def test_an_unwritable_cache_keeps_the_choice_for_this_process(gpu, monkeypatch, tmp_path):
    _, launches, _ = gpu
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("DALLE_ENGINE_TILE_CACHE", str(blocker / "tiles.json"))
    with pytest.warns(UserWarning, match="cannot write the attention tile cache"):
        assert choose(launches) == FAST
    assert choose(launches) == FAST and len(launches) == 3


def test_the_cache_lives_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DALLE_ENGINE_TILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_path() == tmp_path / "dalle_engine" / "attention-tiles.json"


@pytest.mark.parametrize("key", sorted(tuning.DEFAULTS, key=str), ids=str)
def test_every_table_row_has_distinct_candidates_the_default_first(key):
    for index, kernel in enumerate(tuning.KERNELS):
        found = tuning.candidates(kernel, key)
        assert found[0] == tuning.DEFAULTS[key][index] and len(set(found)) == len(found)
        for tiles in found:
            assert {tiles.block_m, tiles.block_n} <= {16, 32, 64, 128} and tiles.num_warps in (4, 8)
            assert 1 <= tiles.num_stages <= 3


@pytest.mark.parametrize("arch, expected", [(80, 80), (86, 80), (89, 80), (90, 90), (100, 90), (120, 90)])
def test_table_rows_by_architecture(arch, expected):
    assert tuning.table_key(arch, torch.float16, "tf32", 128) == (expected, "16-bit", True)
    assert tuning.table_key(arch, torch.float32, "tf32", 64)[1:] == ("tf32", False)
    assert tuning.table_key(arch, torch.float32, "ieee", 64)[1:] == ("fp32", False)
