"""Slicer-side helpers of the BasalSegSAM module.

Every submodule here can be imported without Qt, CTK or the Slicer GUI, so they are tested
outside Slicer against ``slicer-core`` (real MRML) and plain Python:

* :mod:`.parameters`     run options, rendered as command-line arguments (stdlib only)
* :mod:`.processrunner`  the background child process: JSON progress, cancel kills the tree (stdlib only)
* :mod:`.dependencies`   which Python packages are missing, and the explicit install step (stdlib only)
* :mod:`.segmentworker`  the child-side ``segment`` command with a slice-mask cache (no Slicer)
* :mod:`.mrmlbridge`     volume node <-> array + affine, labels -> segmentation node, volumes -> table node
* :mod:`.promptmarkups`  prompts <-> Markups ROI and point nodes, and the per-slice prompt editor
* :mod:`.jobs`           one run of ``basalseg`` in a temporary folder, outputs read back on success
* :mod:`.logic`          the module's logic without the widget (MRML + jobs)

This ``__init__`` imports nothing, so ``import BasalSegSAMLib`` never pulls in Qt or Slicer.
"""

__all__: list[str] = []
