"""The segment worker's slice-mask cache file and command line (no networks run here; the
end-to-end reuse through a real run is in test_slicer_e2e.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from BasalSegSAMLib import segmentworker as sw  # noqa: E402
from basalseg.foundation.runner import SliceMaskCache  # noqa: E402
from basalseg.imageio import Volume  # noqa: E402


def _volume(seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(rng.random((6, 5, 4)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))


def _cache() -> SliceMaskCache:
    rng = np.random.default_rng(1)
    cache = SliceMaskCache()
    cache.entries[3] = ("sig-a", "litemedsam", {"left_putamen": (4, 7, rng.random((5, 6)) > 0.5),
                                                "right_caudate": (0, 2, rng.random((3, 2)) > 0.5)})
    cache.entries[11] = ("sig-b", "litemedsam", {"left_thalamus": (9, 1, np.ones((2, 2), bool))})
    return cache


def test_cache_round_trip_is_exact(tmp_path):
    key = sw.cacheKey(_volume(), "litemedsam", None, True)
    path = tmp_path / "cache.npz"
    sw.saveCache(path, _cache(), key)
    loaded = sw.loadCache(path, key)
    original = _cache()
    assert set(loaded.entries) == {3, 11}
    for k, (signature, backend, masks) in original.entries.items():
        got = loaded.entries[k]
        assert got[0] == signature and got[1] == backend and set(got[2]) == set(masks)
        for name, (x0, y0, mask) in masks.items():
            assert got[2][name][:2] == (x0, y0) and np.array_equal(got[2][name][2], mask)
    assert loaded.get(3, "sig-a", "litemedsam") is not None and loaded.get(3, "changed", "litemedsam") is None
    with np.load(path, allow_pickle=False) as data:  # plain arrays and JSON, no pickle
        assert json.loads(str(data["meta"]))["key"] == key


def test_cache_for_another_image_or_backend_starts_empty(tmp_path):
    key = sw.cacheKey(_volume(), "litemedsam", None, True)
    path = tmp_path / "cache.npz"
    sw.saveCache(path, _cache(), key)
    for other in (sw.cacheKey(_volume(seed=5), "litemedsam", None, True), sw.cacheKey(_volume(), "sam2", None, True),
                  sw.cacheKey(_volume(), "litemedsam", "x.pt", True), sw.cacheKey(_volume(), "litemedsam", None, False)):
        assert other != key
        assert sw.loadCache(path, other).entries == {}
    assert sw.loadCache(tmp_path / "missing.npz", key).entries == {}
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    assert sw.loadCache(tmp_path / "broken.npz", key).entries == {}


def test_worker_takes_the_segment_options_and_reports_errors_as_json(tmp_path):
    """Started as the module starts it (bootstrap, no PYTHONPATH, another working folder)."""
    import os

    from BasalSegSAMLib.jobs import defaultCommandPrefix

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8bnot really")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        defaultCommandPrefix("segment", sys.executable) + [
            str(bad), "--out", str(tmp_path / "out"), "--progress", "json", "--cache", str(tmp_path / "c.npz"),
            "--foundation", "litemedsam", "--band", "5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "error" and "broken.nii.gz" in events[-1]["message"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.npz").exists()


def test_split_removes_only_the_cache_option():
    assert sw._split(["a.nii", "--cache", "c.npz", "--out", "o"]) == ("c.npz", ["a.nii", "--out", "o"])
    assert sw._split(["--cache=c.npz", "x"]) == ("c.npz", ["x"])
    assert sw._split(["x"]) == (None, ["x"])

