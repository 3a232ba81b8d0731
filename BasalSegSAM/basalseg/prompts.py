"""Per-slice prompts: extraction from a coarse labelmap, and the editable ``prompts.json``.

Coordinate convention (stated once, used by every backend and by the Slicer bridge):

* Prompts live on the **canonical grid** (:mod:`basalseg.spatial`): RAS+, isotropic, indexed
  ``[i, j, k]``. A prompt belongs to one **axial slice** ``k`` (``volume[:, :, k]``).
* In that slice, ``x`` is the ``i`` index and ``y`` the ``j`` index, in voxel (pixel-centre)
  units, so the 2D slice image seen by a foundation model is ``volume[:, :, k].T`` (rows ``y``,
  columns ``x``).
* A **box** is ``[x0, y0, x1, y1]`` (XYXY) with both corners inclusive: the box covers pixel
  centres ``x0..x1`` and ``y0..y1``.
* **Points** are ``[x, y]``; ``point_labels`` are 1 for a positive point (inside the structure)
  and 0 for a negative one (background). Generated prompts carry 5 positive points; negative
  points are never generated, users add them when correcting a leak.

``prompts.json`` (format ``basalseg-prompts``, version 1) stores the canonical grid's shape and
affine, so the boxes can be placed in world space (the Slicer module does), and a prompt file
made for another image is refused.

**Other planes** (multi-plane fusion, ``--planes``; see ``docs/CONTEXT_AND_PLANES.md``). A
:class:`PromptSet` carries an ``axis``: 2 = axial (the default, and the only plane
``prompts.json`` holds), 1 = coronal, 0 = sagittal. A prompt's ``slice`` is its index along that
axis, and its ``x``/``y`` are the two *other* canonical indices in increasing axis order
(:func:`plane_axes`):

=========  ======  =================  ====================  ========================
plane      axis    slice index        x (image columns)     y (image rows)
=========  ======  =================  ====================  ========================
axial      2       ``k``              ``i``                 ``j``
coronal    1       ``j``              ``i``                 ``k``
sagittal   0       ``i``              ``j``                 ``k``
=========  ======  =================  ====================  ========================

so the foundation model's image of coronal slice ``j`` is ``volume[:, j, :].T`` and of sagittal
slice ``i`` is ``volume[i, :, :].T`` (rows ``y``, columns ``x``, exactly as axial; like the
axial image, they are not flipped to a display orientation). Coronal and sagittal prompts are
made internally from the prompt generator's labelmap (:func:`prompts_from_classes` with
``axis``), recorded in ``provenance.json`` (their ``to_dict`` carries a ``"plane"`` field), and
are not editable: :func:`load_prompts` refuses a file that is not axial.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import PromptsError
from .options import PLANES
from .spatial import Grid
from .structures import STRUCTURES, Structure, get_structure

__all__ = [
    "Prompt",
    "PromptSet",
    "prompts_from_classes",
    "plane_prompt_sets",
    "prompt_from_mask",
    "load_prompts",
    "prompts_from_dict",
    "save_prompts",
    "PROMPTS_FORMAT",
    "PROMPTS_VERSION",
    "PLANES",
    "plane_axes",
    "plane_name",
    "normalise_planes",
]

PROMPTS_FORMAT = "basalseg-prompts"
PROMPTS_VERSION = 1
AXIS_CONVENTION = (
    "Canonical RAS+ grid indexed [i,j,k]; a prompt belongs to axial slice k; x=i, y=j in voxel units; "
    "box=[x0,y0,x1,y1] inclusive pixel centres; points=[x,y]; point_labels 1=positive, 0=negative."
)

#: plane name -> the canonical axis its slices are taken across (``volume`` indexed ``[i, j, k]``):
#: :data:`basalseg.options.PLANES`, re-exported here.
_PLANE_OF_AXIS = {axis: name for name, axis in PLANES.items()}
_PLANE_CONVENTION = {
    1: ("Canonical RAS+ grid indexed [i,j,k]; a prompt belongs to coronal slice j; x=i, y=k in voxel units "
        "(image = volume[:, j, :].T); box=[x0,y0,x1,y1] inclusive pixel centres; points=[x,y]; "
        "point_labels 1=positive, 0=negative. Internal (multi-plane fusion), not editable."),
    0: ("Canonical RAS+ grid indexed [i,j,k]; a prompt belongs to sagittal slice i; x=j, y=k in voxel units "
        "(image = volume[i, :, :].T); box=[x0,y0,x1,y1] inclusive pixel centres; points=[x,y]; "
        "point_labels 1=positive, 0=negative. Internal (multi-plane fusion), not editable."),
}


def plane_axes(axis: int) -> tuple[int, int]:
    """The canonical axes ``(x_axis, y_axis)`` of a slice taken across ``axis``: the two other axes
    in increasing order (axial: ``(0, 1)`` = (i, j); coronal: ``(0, 2)`` = (i, k); sagittal:
    ``(1, 2)`` = (j, k))."""
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    u, v = (a for a in (0, 1, 2) if a != axis)
    return u, v


def plane_name(axis: int) -> str:
    """``"axial"``, ``"coronal"`` or ``"sagittal"`` for canonical axis 2, 1 or 0."""
    plane_axes(axis)
    return _PLANE_OF_AXIS[axis]


def normalise_planes(planes) -> tuple[str, ...]:
    """Validate a list of plane names (or one comma-separated string) and return them without
    repeats in the fixed order axial, coronal, sagittal (so results never depend on the order
    they were asked in).

    Raises:
        ValueError: empty, or an unknown plane name (the message lists the known ones).
    """
    if isinstance(planes, str):
        planes = [p for p in planes.split(",")]
    names = [str(p).strip().lower() for p in planes]
    names = [p for p in names if p]
    unknown = [p for p in names if p not in PLANES]
    if unknown:
        raise ValueError(f"unknown plane {unknown[0]!r}; choose from {', '.join(PLANES)}")
    if not names:
        raise ValueError(f"at least one plane is needed ({', '.join(PLANES)})")
    return tuple(p for p in PLANES if p in names)


@dataclass
class Prompt:
    """The prompt for one structure on one slice (see module docstring for axes).

    Attributes:
        structure: the structure's key (``left_putamen``).
        slice: slice index along its set's axis on the canonical grid (axial ``k`` unless the
            :class:`PromptSet` is coronal or sagittal).
        box: ``[x0, y0, x1, y1]`` inclusive, pixels.
        points: ``(P, 2)`` list of ``[x, y]``.
        point_labels: ``P`` values, 1 positive, 0 negative.
    """

    structure: str
    slice: int
    box: list[float]
    points: list[list[float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)

    @property
    def struct(self) -> Structure:
        return get_structure(self.structure)

    def to_dict(self) -> dict:
        return {
            "structure": self.structure,
            "slice": int(self.slice),
            "box": [round(float(v), 3) for v in self.box],
            "points": [[round(float(x), 3), round(float(y), 3)] for x, y in self.points],
            "point_labels": [int(v) for v in self.point_labels],
        }


@dataclass
class PromptSet:
    """All prompts for one image and one plane, with the canonical grid they refer to.

    ``axis`` is the canonical axis the slices are taken across: 2 = axial (default; the only
    plane of ``prompts.json``), 1 = coronal, 0 = sagittal (module docstring).
    """

    grid: Grid
    prompts: list[Prompt] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    axis: int = 2

    @property
    def plane(self) -> str:
        """``"axial"``, ``"coronal"`` or ``"sagittal"``."""
        return plane_name(self.axis)

    def plane_shape(self) -> tuple[int, int, int]:
        """``(nx, ny, n_slices)``: the sizes of the ``x`` and ``y`` axes of a slice, and the number of slices."""
        u, v = plane_axes(self.axis)
        shape = tuple(int(n) for n in self.grid.shape)
        return shape[u], shape[v], shape[self.axis]

    def slices(self) -> list[int]:
        """Slice indices (along ``axis``) that carry at least one prompt, ascending."""
        return sorted({p.slice for p in self.prompts})

    def on_slice(self, k: int) -> list[Prompt]:
        """Prompts on slice ``k`` in structure (class index) order."""
        return sorted((p for p in self.prompts if p.slice == k), key=lambda p: p.struct.class_index)

    def for_structure(self, key: str) -> list[Prompt]:
        key = get_structure(key).key
        return sorted((p for p in self.prompts if p.structure == key), key=lambda p: p.slice)

    def structures_found(self) -> list[str]:
        keys = {p.structure for p in self.prompts}
        return [s.key for s in STRUCTURES if s.key in keys]

    def to_dict(self) -> dict:
        """The ``prompts.json`` object. Axial sets are written exactly as before; a coronal or
        sagittal set (internal, recorded in provenance) adds ``"plane"`` and states its axes."""
        out = {
            "format": PROMPTS_FORMAT,
            "version": PROMPTS_VERSION,
            "axis_convention": AXIS_CONVENTION if self.axis == 2 else _PLANE_CONVENTION[self.axis],
            "grid": self.grid.to_dict(),
            "source": self.source,
            "prompts": [p.to_dict() for p in sorted(self.prompts, key=lambda p: (p.slice, p.struct.class_index))],
        }
        if self.axis != 2:
            out = {"format": out.pop("format"), "version": out.pop("version"), "plane": self.plane, **out}
        return out

    def validate(self) -> "PromptSet":
        """Check every prompt against the grid; raise :class:`PromptsError` naming the first problem."""
        nx, ny, nz = self.plane_shape()
        seen: set[tuple[str, int]] = set()
        for n, p in enumerate(self.prompts):
            where = f"prompt {n} ({p.structure}, slice {p.slice})"
            p.structure = get_structure(p.structure).key  # raises UnknownStructureError
            if not 0 <= p.slice < nz:
                raise PromptsError(f"{where}: slice {p.slice} is outside the image (0..{nz - 1})")
            if (p.structure, p.slice) in seen:
                raise PromptsError(f"{where}: a second prompt for the same structure and slice")
            seen.add((p.structure, p.slice))
            if len(p.box) != 4 or not all(math.isfinite(v) for v in p.box):
                raise PromptsError(f"{where}: box must be 4 finite numbers [x0, y0, x1, y1]")
            x0, y0, x1, y1 = p.box
            if x0 > x1 or y0 > y1:
                raise PromptsError(f"{where}: box {p.box} has x0 > x1 or y0 > y1")
            if x0 < 0 or y0 < 0 or x1 > nx - 1 or y1 > ny - 1:
                raise PromptsError(f"{where}: box {p.box} lies outside the image (x 0..{nx - 1}, y 0..{ny - 1})")
            if len(p.points) != len(p.point_labels):
                raise PromptsError(f"{where}: {len(p.points)} points but {len(p.point_labels)} point_labels")
            for pt, lab in zip(p.points, p.point_labels):
                if len(pt) != 2 or not all(math.isfinite(v) for v in pt):
                    raise PromptsError(f"{where}: point {pt} must be [x, y]")
                if not (0 <= pt[0] <= nx - 1 and 0 <= pt[1] <= ny - 1):
                    raise PromptsError(f"{where}: point {pt} lies outside the image")
                if lab not in (0, 1):
                    raise PromptsError(f"{where}: point label {lab} must be 1 (positive) or 0 (negative)")
        return self

    def template_to_input(self) -> np.ndarray | None:
        """For the prompts of a **localised** image (``basalseg prompts`` or ``segment`` on a whole
        head, :mod:`basalseg.localise`): the 4x4 RAS matrix, template world -> input world, under
        which they were made (``source["localisation"]``); ``None`` for prompts on the input's own
        canonical grid. Such prompts live on the brain template's grid, not the input's."""
        loc = self.source.get("localisation") if isinstance(self.source, dict) else None
        if not isinstance(loc, dict) or not loc.get("applied") or loc.get("template_to_input") is None:
            return None
        matrix = np.asarray(loc["template_to_input"], dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise PromptsError("prompts: source.localisation.template_to_input must be a finite 4x4 matrix")
        return matrix

    def world_grid(self) -> Grid:
        """The grid whose affine takes a prompt's ``(x, y, k)`` voxel to world RAS mm **of the image
        the prompts were made for**: ``grid`` itself, or for a localised image's prompts
        ``template_to_input @ grid.affine`` (the template grid moved into the head's pose, and since
        2026-12-07 scaled and sheared to the head's brain by the affine localisation). Same shape as ``grid``."""
        matrix = self.template_to_input()
        return self.grid if matrix is None else Grid(tuple(self.grid.shape), matrix @ np.asarray(self.grid.affine, np.float64))

    def check_grid(self, grid: Grid, atol: float = 1e-3) -> None:
        """Refuse prompts made for another image grid."""
        if tuple(grid.shape) != tuple(self.grid.shape) or not np.allclose(grid.affine, self.grid.affine, atol=atol):
            raise PromptsError(
                "prompts were made for another image: their grid "
                f"{list(self.grid.shape)} does not match this image's canonical grid {list(grid.shape)}"
            )


def prompt_from_mask(mask2d: np.ndarray, structure: str, k: int, n_points: int = 5, box_margin: int = 2) -> Prompt:
    """Box and positive points for one structure's mask on one slice.

    Args:
        mask2d: boolean ``(X, Y)`` mask, indexed ``[x, y]`` (= ``volume[:, :, k]``).
        structure: structure key.
        k: slice index.
        n_points: number of positive points. The first is the mask's deepest pixel (largest
            distance to the background); the others are chosen by farthest-point sampling among
            pixels at least 2 px inside (all mask pixels when too few are), so they spread over
            the structure. Ties go to the lowest index, so the result is deterministic.
        box_margin: pixels added on each side of the tight box, clipped to the slice.

    Returns:
        The prompt.
    """
    mask2d = np.asarray(mask2d, dtype=bool)
    xs, ys = np.nonzero(mask2d)
    if xs.size == 0:
        raise ValueError("empty mask")
    nx, ny = mask2d.shape
    box = [
        float(max(xs.min() - box_margin, 0)),
        float(max(ys.min() - box_margin, 0)),
        float(min(xs.max() + box_margin, nx - 1)),
        float(min(ys.max() + box_margin, ny - 1)),
    ]
    depth = ndimage.distance_transform_edt(np.pad(mask2d, 1))[1:-1, 1:-1]
    candidates = np.argwhere(depth >= 2.0)
    if len(candidates) < n_points:
        candidates = np.argwhere(mask2d)
    first = np.unravel_index(int(np.argmax(depth)), depth.shape)
    chosen = [np.array(first)]
    dist = np.linalg.norm(candidates - chosen[0], axis=1)
    while len(chosen) < min(n_points, len(candidates)):
        nxt = candidates[int(np.argmax(dist))]
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(candidates - nxt, axis=1))
    while len(chosen) < n_points:  # tiny masks: repeat the deepest point
        chosen.append(chosen[0])
    points = [[float(c[0]), float(c[1])] for c in chosen]
    return Prompt(structure, int(k), box, points, [1] * n_points)


def prompts_from_classes(
    classes: np.ndarray, grid: Grid, min_pixels: int = 4, n_points: int = 5, box_margin: int = 2, axis: int = 2
) -> PromptSet:
    """Prompts for every structure on every slice of a class-index labelmap, across ``axis``.

    Args:
        classes: ``(X, Y, Z)`` class indices (0..8) on the canonical grid (usually the prompt
            generator's coarse output).
        grid: that canonical grid.
        min_pixels: slices where a structure has fewer pixels get no prompt.
        n_points, box_margin: see :func:`prompt_from_mask`.
        axis: 2 = axial slices (default, ``prompts.json``), 1 = coronal, 0 = sagittal. A slice's
            2D mask is indexed ``[x, y]`` with ``x``/``y`` the other two canonical axes in
            increasing order (module docstring), so the boxes and points follow that plane's
            convention.
    """
    if classes.shape != tuple(grid.shape):
        raise ValueError(f"labelmap shape {classes.shape} does not match grid {grid.shape}")
    plane_axes(axis)
    prompts: list[Prompt] = []
    for s in STRUCTURES:
        mask = np.moveaxis(classes == s.class_index, axis, -1)  # (x, y, slice) for this plane
        per_slice = mask.sum(axis=(0, 1))
        for k in np.nonzero(per_slice >= min_pixels)[0]:
            prompts.append(prompt_from_mask(mask[:, :, k], s.key, int(k), n_points, box_margin))
    return PromptSet(grid=grid, prompts=prompts, axis=axis)


def plane_prompt_sets(axial: PromptSet, classes: np.ndarray | None, planes, min_pixels: int = 4
                      ) -> dict[str, PromptSet]:
    """The prompts of every plane of ``planes``, as inference and the training cache both use them.

    Axial: ``axial`` itself (generated or given). Coronal and sagittal: drawn from the prompt
    generator's labelmap ``classes`` (on ``axial.grid``) across that axis
    (:func:`prompts_from_classes` with ``min_pixels``), keeping only the structures ``axial``
    has, so every plane agrees on which structures exist; their ``source`` is
    ``{"generator": "prompter", "plane": name}``.

    Args:
        axial: the axial prompts.
        classes: ``(X, Y, Z)`` class-index labelmap; only read for coronal/sagittal planes.
        planes: plane names (:func:`normalise_planes`).
        min_pixels: as :func:`prompts_from_classes`.

    Returns:
        ``{plane: prompts}`` in the fixed order axial, coronal, sagittal, the planes asked for only
        (``"axial"`` always included).

    Raises:
        ValueError: an unknown plane, or coronal/sagittal planes without ``classes``.
    """
    planes = normalise_planes(planes)
    out = {"axial": axial}
    keep = set(axial.structures_found())
    for plane in planes:
        if plane == "axial":
            continue
        if classes is None:
            raise ValueError(f"{plane} prompts need the prompt generator's labelmap")
        ps = prompts_from_classes(classes, axial.grid, min_pixels=min_pixels, axis=PLANES[plane])
        ps.prompts = [q for q in ps.prompts if q.structure in keep]
        ps.source = {"generator": "prompter", "plane": plane}
        out[plane] = ps
    return out


def _parse(data: object, name: str) -> PromptSet:
    if not isinstance(data, dict):
        raise PromptsError(f"{name}: top level must be a JSON object")
    if data.get("format") != PROMPTS_FORMAT:
        raise PromptsError(f"{name}: not a BasalSegSAM prompts file (format {data.get('format')!r})")
    if data.get("version") != PROMPTS_VERSION:
        raise PromptsError(f"{name}: prompts version {data.get('version')!r} is not supported (need {PROMPTS_VERSION})")
    try:
        grid = Grid.from_dict(data["grid"])
        if len(grid.shape) != 3 or min(grid.shape) < 1 or grid.affine.shape != (4, 4):
            raise ValueError("grid must have a 3D shape and a 4x4 affine")
        if not np.isfinite(grid.affine).all():
            raise ValueError("grid affine must hold finite numbers")
        prompts = []
        for n, item in enumerate(_as_list(data.get("prompts", []), "prompts")):
            if not isinstance(item, dict):
                raise ValueError(f"prompt {n} is not an object")
            where = f"prompt {n}"
            points = _as_list(item.get("points", []), f"{where} points")
            labels = _as_list(item.get("point_labels", [1] * len(points)), f"{where} point_labels")
            structure = item["structure"]
            if not isinstance(structure, str):
                raise ValueError(f"{where} structure must be a structure name (text), got {structure!r}")
            prompts.append(
                Prompt(
                    structure=structure,
                    slice=_as_int(item["slice"], f"{where} slice"),
                    box=[_as_number(v, f"{where} box") for v in _as_list(item["box"], f"{where} box")],
                    points=[[_as_number(v, f"{where} point") for v in _as_list(pt, f"{where} point")] for pt in points],
                    point_labels=[_as_int(v, f"{where} point label") for v in labels],
                )
            )
    except PromptsError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: a number too large for a float
        missing = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise PromptsError(f"{name}: malformed prompts ({missing})") from exc
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    plane = data.get("plane", "axial")
    if not isinstance(plane, str) or plane not in PLANES:
        raise PromptsError(f"{name}: unknown plane {plane!r} (expected one of {', '.join(PLANES)})")
    try:
        return PromptSet(grid=grid, prompts=prompts, source=source, axis=PLANES[plane]).validate()
    except PromptsError as exc:
        raise type(exc)(f"{name}: {exc}") from None


def _as_list(value: object, what: str) -> list:
    """A JSON array, refused otherwise (a string such as ``"1234"`` is not four numbers)."""
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, got {type(value).__name__} {value!r:.60}")
    return value


def _as_number(value: object, what: str) -> float:
    """A JSON number (not a boolean, not a string of digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} values must be numbers, got {value!r:.60}")
    return float(value)


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value)


def load_prompts(path: str | os.PathLike) -> PromptSet:
    """Read and validate a ``prompts.json`` (axial prompts: the only editable plane).

    Raises:
        PromptsError: unreadable, malformed or out-of-range, or the prompts of another plane
            (the internal coronal/sagittal sets recorded in provenance); the message names the problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptsError(f"{path}: cannot read prompts ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptsError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits; nesting too deep
        raise PromptsError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from exc
    prompt_set = _parse(data, str(path))
    if prompt_set.axis != 2:
        raise PromptsError(f"{path}: holds {prompt_set.plane} prompts; prompts files are axial only (coronal and "
                           "sagittal prompts for multi-plane fusion are made from the prompt generator)")
    return prompt_set


def prompts_from_dict(data: dict, name: str = "prompts") -> PromptSet:
    """Validate prompts given as a parsed JSON object (see :func:`load_prompts`); unlike it, also
    reads the coronal/sagittal sets recorded in provenance (a ``"plane"`` field)."""
    return _parse(data, name)


def save_prompts(prompt_set: PromptSet, path: str | os.PathLike) -> None:
    """Write ``prompts.json`` atomically (temporary file, then rename)."""
    from .outputs import atomic_write_text

    atomic_write_text(Path(path), json.dumps(prompt_set.to_dict(), indent=1))
