"""Bounded fuzzing (hypothesis) of the two readers that take files from users.

* ``prompts.json`` (:func:`basalseg.prompts.load_prompts` / ``prompts_from_dict``): random JSON
  structures, mutations of a valid file's structure (a field replaced, removed or set to a value at
  or past a boundary) and of its text (bytes flipped, cut, inserted). Each example must load or
  raise :class:`~basalseg.errors.PromptsError`; what loads must be valid and survive a round trip.
* NIfTI images (:func:`basalseg.imageio.load_volume`): random bytes, truncations, header field
  mutations and flipped bytes in the gzip stream of a small real image, written under ``.nii`` and
  ``.nii.gz`` names. Each example must load or raise :class:`~basalseg.errors.InputImageError`; what
  loads must be a finite, non-constant 3D float32 volume with a usable affine.

About 200 examples per property, derandomised (the same examples on every run, as CI needs) and
about 20 s in all on 2 busy cores. ``BASALSEG_FUZZ_EXAMPLES`` raises the count for a longer hunt.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from basalseg.errors import InputImageError, PromptsError  # noqa: E402
from basalseg.imageio import Volume, load_volume  # noqa: E402
from basalseg.prompts import Prompt, PromptSet, load_prompts, prompts_from_dict  # noqa: E402
from basalseg.spatial import Grid  # noqa: E402

EXAMPLES = int(os.environ.get("BASALSEG_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------
# prompts.json
# ---------------------------------------------------------------------------------------------

#: numbers at and past every boundary the reader checks
EDGE_NUMBERS = st.sampled_from([0, -1, 1, 2, 7, 8, 9, 11, 0.5, -0.0, 1e-300, 1e308, -1e308, float("nan"),
                                float("inf"), float("-inf"), 2**31, 2**63, -(2**63), 10**30, 10**400, -(10**400), True])
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | EDGE_NUMBERS
           | st.sampled_from(["left_putamen", "Left-Putamen", "12", "basalseg-prompts", "", "NaN"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                    | st.dictionaries(st.text(max_size=10) | st.sampled_from(
                        ["format", "version", "grid", "shape", "affine", "prompts", "structure", "slice", "box",
                         "points", "point_labels", "source"]), inner, max_size=6), max_leaves=25)

GRID = Grid((12, 10, 9), np.diag([1.0, 1.0, 1.0, 1.0]))


def _valid() -> dict:
    prompts = [Prompt("left_putamen", 3, [1.0, 2.0, 6.0, 7.0], [[3.0, 4.0], [5.0, 5.0]], [1, 0]),
               Prompt("right_thalamus", 3, [7.0, 1.0, 11.0, 9.0]),
               Prompt("left_caudate", 8, [0.0, 0.0, 11.0, 9.0], [[11.0, 9.0]], [1])]
    return PromptSet(grid=GRID, prompts=prompts, source={"generator": "fuzz"}).to_dict()


VALID = _valid()


def _paths(node, prefix=()):
    """Every path (tuple of keys/indices) inside a JSON value, the root included."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for n, value in enumerate(node):
            yield from _paths(value, prefix + (n,))


def _check_loaded(prompt_set: PromptSet) -> None:
    """What the reader accepts is valid and survives a round trip through its JSON form."""
    assert isinstance(prompt_set, PromptSet)
    prompt_set.validate()
    nx, ny, nz = prompt_set.grid.shape
    for p in prompt_set.prompts:
        assert 0 <= p.slice < nz
        assert all(math.isfinite(v) for v in p.box) and 0 <= p.box[0] <= p.box[2] <= nx - 1
    again = prompts_from_dict(json.loads(json.dumps(prompt_set.to_dict())))
    assert again.to_dict() == prompt_set.to_dict()


def _parse_or_prompts_error(data) -> None:
    try:
        result = prompts_from_dict(data)
    except PromptsError as exc:
        assert str(exc).strip(), "an error must say what is wrong"
        return
    _check_loaded(result)


@FUZZ
@given(JSON)
def test_random_json_structures(data):
    _parse_or_prompts_error(data)


@FUZZ
@given(st.data())
def test_mutations_of_a_valid_prompts_file(data):
    doc = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = list(_paths(doc))
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(st.sampled_from(["replace", "edge", "delete", "duplicate"]), label="action")
        if not path:
            doc = data.draw(JSON, label="new root")
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if action == "delete":
            del parent[key]
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        else:
            parent[key] = data.draw(EDGE_NUMBERS if action == "edge" else JSON, label="value")
        if not isinstance(doc, (dict, list)):
            break
    _parse_or_prompts_error(doc)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="basalseg-fuzz-") as folder:
        yield Path(folder)


@FUZZ
@given(st.data())
def test_byte_mutations_of_a_prompts_file(scratch, data):
    raw = bytearray(json.dumps(VALID, indent=1).encode())
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        where = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="where")
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate"]), label="kind")
        if kind == "flip" and raw:
            raw[where] ^= data.draw(st.integers(1, 255), label="mask")
        elif kind == "cut":
            del raw[where : where + data.draw(st.integers(1, 40), label="length")]
        elif kind == "insert":
            raw[where:where] = data.draw(st.binary(min_size=1, max_size=12) | st.sampled_from(
                [b"[" * 5000, b"9" * 5000, b"\xef\xbb\xbf", b"NaN", b"1e999", b"\x00"]), label="bytes")
        else:
            del raw[where:]
    path = scratch / "prompts.json"
    path.write_bytes(bytes(raw))
    try:
        result = load_prompts(path)
    except PromptsError as exc:
        assert str(path) in str(exc), "the error names the file"
        return
    _check_loaded(result)


def test_deep_nesting_and_huge_numbers_are_prompts_errors(tmp_path):
    """Found by the fuzzing above: JSON nested too deep (RecursionError), an integer literal of more
    than 4300 digits (ValueError) and numbers too large for a float (OverflowError) escaped the reader."""
    for text in ("[" * 100000, '{"version": 1' + "0" * 5000 + "}",
                 json.dumps(dict(VALID, prompts=[dict(VALID["prompts"][0], slice=10**400)])),
                 json.dumps(dict(VALID, grid={"shape": [float("inf"), 3, 3], "affine": VALID["grid"]["affine"]})),
                 json.dumps(dict(VALID, grid={"shape": [3, 3, 3], "affine": [[float("nan")] * 4] * 4}))):
        path = tmp_path / "p.json"
        path.write_text(text)
        with pytest.raises(PromptsError):
            load_prompts(path)


# ---------------------------------------------------------------------------------------------
# NIfTI images
# ---------------------------------------------------------------------------------------------


class _Seed(bytes):
    """The seed file's bytes, shown briefly in hypothesis' reports."""

    def __repr__(self) -> str:
        return f"<seed.nii, {len(self)} bytes>"


@pytest.fixture(scope="module")
def nifti_seed(bg_crop_1mm):
    """A small real image (a 12x10x8 block of the MNI T1, float32, oblique-free LAS affine) as the
    bytes of an uncompressed .nii: the 348-byte header, 4 bytes of extension flag, the voxels."""
    import nibabel as nib

    data = np.ascontiguousarray(bg_crop_1mm.data[30:42, 30:40, 15:23])
    img = nib.Nifti1Image(data, bg_crop_1mm.affine)
    img.set_qform(bg_crop_1mm.affine, 1)
    with tempfile.TemporaryDirectory() as folder:
        nib.save(img, f"{folder}/seed.nii")
        raw = Path(f"{folder}/seed.nii").read_bytes()
    assert len(raw) == 352 + data.size * 4
    return _Seed(raw)


#: (offset, struct format) of the NIfTI-1 header fields that matter for reading
FIELDS = [(0, "<i"), (40, "<h"), (42, "<h"), (44, "<h"), (46, "<h"), (48, "<h"), (70, "<h"), (72, "<h"), (76, "<f"),
          (80, "<f"), (84, "<f"), (88, "<f"), (108, "<f"), (112, "<f"), (116, "<f"), (252, "<h"), (254, "<h"),
          (256, "<f"), (260, "<f"), (264, "<f"), (268, "<f"), (272, "<f"), (276, "<f"), (280, "<f"), (296, "<f"),
          (312, "<f"), (344, "<4s")]
FIELD_VALUES = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 16, 64, 255, 348, 352, 540, 1024, 4096, 32767, -1, -32768,
                                2**31 - 1, -(2**31), 0.5, 1e-30, 1e30, 3.4e38, float("nan"), float("inf"),
                                float("-inf"), b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0"])


def _set_field(raw: bytearray, offset: int, fmt: str, value) -> None:
    try:
        if fmt.endswith("s"):
            packed = value if isinstance(value, bytes) else struct.pack("<i", int(value) & 0x7FFFFFFF)
        elif fmt.endswith("f"):
            packed = struct.pack(fmt, float(value) if not isinstance(value, bytes) else 0.0)
        else:
            packed = struct.pack(fmt, int(value) if not isinstance(value, bytes) else 0)
    except (struct.error, OverflowError, ValueError):
        return
    raw[offset : offset + len(packed)] = packed[: len(raw) - offset]


def _load_or_input_error(scratch: Path, payload: bytes, name: str) -> Volume | None:
    path = scratch / name
    path.write_bytes(payload)
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)  # its header-repair chatter
    try:
        volume = load_volume(path)
    except InputImageError as exc:
        message = str(exc)
        assert str(path) in message and "\n" not in message, message
        return
    assert isinstance(volume, Volume) and volume.data.ndim == 3 and min(volume.shape) >= 2
    assert volume.data.dtype == np.float32 and np.isfinite(volume.data).all()
    assert volume.data.max() > volume.data.min()
    assert np.isfinite(volume.affine).all() and abs(np.linalg.det(volume.affine[:3, :3])) > 1e-9
    return volume


NAMES = st.sampled_from(["x.nii", "x.nii.gz"])


@FUZZ
@given(st.binary(max_size=3000), NAMES)
def test_random_bytes(scratch, payload, name):
    _load_or_input_error(scratch, payload, name)


@FUZZ
@given(st.data())
def test_truncations_and_header_mutations(scratch, nifti_seed, data):
    raw = bytearray(nifti_seed)
    for _ in range(data.draw(st.integers(0, 4), label="field edits")):
        offset, fmt = data.draw(st.sampled_from(FIELDS), label="field")
        _set_field(raw, offset, fmt, data.draw(FIELD_VALUES, label="value"))
    for _ in range(data.draw(st.integers(0, 3), label="byte edits")):
        raw[data.draw(st.integers(0, 351), label="header byte")] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")]
    name = data.draw(NAMES, label="name")
    payload = gzip.compress(bytes(raw), mtime=0) if name.endswith(".gz") else bytes(raw)
    _load_or_input_error(scratch, payload, name)


@pytest.fixture(scope="module")
def seed_voxels(scratch, nifti_seed):
    path = scratch / "seed.nii"
    path.write_bytes(nifti_seed)
    return load_volume(path).data


@FUZZ
@given(st.data())
def test_damaged_gzip_streams(scratch, nifti_seed, seed_voxels, data):
    """Flipped bytes anywhere in the gzip file: refused, or (a flip in a field that does not matter,
    such as the header's time stamp) loaded with exactly the original voxels, never silently wrong ones."""
    raw = bytearray(gzip.compress(nifti_seed, mtime=0))
    for _ in range(data.draw(st.integers(1, 3), label="flips")):
        where = data.draw(st.integers(0, len(raw) - 1), label="where")
        raw[where] ^= data.draw(st.integers(1, 255), label="mask")
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(2, len(raw) - 1), label="keep")]
    volume = _load_or_input_error(scratch, bytes(raw), "x.nii.gz")
    if volume is not None:
        assert np.array_equal(volume.data, seed_voxels), "a damaged file loaded as different voxels"


def test_found_by_fuzzing_damaged_files_are_input_errors(scratch, nifti_seed):
    """What the fuzzing above found: escaping as other exceptions (CLI exit 1, 'internal error'), a
    flipped byte in the gzip stream (zlib.error), an unknown datatype code or an invalid intercept
    (nibabel's HeaderDataError), a negative vox_offset; loading silently wrong voxels, a flip that
    only the gzip CRC32 catches (nibabel stops reading before the trailer); and a header claiming a
    huge image, which must be refused without allocating it."""
    from test_reliability_matrix import _flip_one_byte

    stream = gzip.compress(nifti_seed, mtime=0)
    cases = {"flip.nii.gz": _flip_one_byte(stream, "deflate"), "crc.nii.gz": _flip_one_byte(stream, "crc")}
    for name, (offset, fmt, value) in {"datatype.nii": (70, "<h", 9999), "intercept.nii": (116, "<f", float("nan")),
                                       "voxoffset.nii": (108, "<f", -16.0),
                                       "huge.nii.gz": (42, "<h", 32767)}.items():
        raw = bytearray(nifti_seed)
        _set_field(raw, offset, fmt, value)
        if name == "huge.nii.gz":
            _set_field(raw, 44, "<h", 32767)
            _set_field(raw, 46, "<h", 32767)
            raw = bytearray(gzip.compress(bytes(raw), mtime=0))
        cases[name] = bytes(raw)
    for name, payload in cases.items():
        path = scratch / name
        path.write_bytes(payload)
        with pytest.raises(InputImageError, match="unreadable"):
            load_volume(path)
