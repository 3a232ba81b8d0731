"""Slicer-side helpers of the BasalSegSAM module.

Qt-free (importable without Qt, CTK or the Slicer GUI; tested against ``slicer-core``'s real
MRML and plain Python):

* :mod:`.parameters`     run options, rendered as command-line arguments (stdlib only)
* :mod:`.processrunner`  the background child process: JSON progress, cancel kills the tree (stdlib only)
* :mod:`.dependencies`   which Python packages are missing, and the explicit install step (stdlib only)
* :mod:`.segmentworker`  the child-side ``segment`` command with a slice-mask cache (no Slicer)
* :mod:`.mrmlbridge`     volume node <-> array + affine, labels -> segmentation node, volumes -> table node
* :mod:`.promptmarkups`  prompts <-> Markups ROI and point nodes (geometry, whole prompt sets)
* :mod:`.prompteditor`   the per-slice prompt editor (locking, signs, edits, undo snapshots)
* :mod:`.jobs`           one run of ``basalseg`` in a temporary folder, outputs read back on success
* :mod:`.logic`          the module's logic without the widget (MRML + jobs), export names

The widget's panel sections, which import ``qt`` and ``slicer.i18n`` (used only by
``BasalSegSAM.py``; tested under the stand-ins in ``Testing/Python/slicerstandin``):

* :mod:`.installpanel`   Setup: missing packages, Install dependencies
* :mod:`.promptpanel`    Prompts: the editor on the Red view, the table, Undo, slice stepping
* :mod:`.resultpanel`    Segmentation and Results: where results go, volumes tables, export
* :mod:`.selftest`       ``BasalSegSAMTest``, the self-test inside real Slicer

This ``__init__`` imports nothing, so ``import BasalSegSAMLib`` never pulls in Qt or Slicer.
"""

__all__: list[str] = []
