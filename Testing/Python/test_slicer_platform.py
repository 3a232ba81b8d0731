"""What differs on Windows: no ``resource``/``fcntl``, console windows, file names.

The Slicer module's background runs build the full ``basalseg`` command-line parser (the worker
and ``basalseg prompts``); a POSIX-only import at module level anywhere in it would make every
run fail on Windows. These tests make those modules unimportable and build the parsers.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from test_slicer_helpers import MODULE_DIR

BLOCK_POSIX = textwrap.dedent(
    """
    import sys
    for name in ("resource", "fcntl"):
        sys.modules[name] = None  # any `import name` now raises ImportError, as on Windows
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_POSIX + textwrap.dedent(code)], cwd=MODULE_DIR,
                          capture_output=True, text=True, timeout=120)


def test_cli_and_worker_parsers_build_without_posix_only_modules():
    result = _run(
        """
        try:
            import resource
        except ImportError:
            pass
        else:
            raise AssertionError("the block did not work")
        from basalseg.commands import build_parser
        import pkgutil, importlib, basalseg.commands
        for m in pkgutil.iter_modules(basalseg.commands.__path__):  # every subcommand module
            importlib.import_module("basalseg.commands." + m.name)
        import basalseg.bench, basalseg.batch  # the library modules of the parser's subcommands
        parser = build_parser()
        args = parser.parse_args(["segment", "T1.nii.gz", "--out", "o", "--progress", "json", "--no-qc"])
        assert str(args.image) == "T1.nii.gz" and args.no_qc
        args = parser.parse_args(["prompts", "T1.nii.gz", "--out", "p", "--device", "cpu"])
        assert args.device == "cpu"
        from BasalSegSAMLib import segmentworker
        cache, rest = segmentworker._split(["T1.nii.gz", "--out", "o", "--cache", "c.npz"])
        args = build_parser().parse_args(["segment", *rest])  # what segmentworker.main does
        assert cache == "c.npz" and str(args.out) == "o"
        import contextlib, io
        from basalseg import commands
        for entry, argv in ((segmentworker.main, ["--help"]), (commands.main, ["prompts", "--help"])):
            text = io.StringIO()
            try:
                with contextlib.redirect_stdout(text):
                    entry(argv)  # the real entry points, up to their parsers
            except SystemExit as exc:
                assert exc.code == 0, exc.code
            assert "--out" in text.getvalue(), text.getvalue()[:200]
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_cancel_on_windows_uses_taskkill_without_a_console_window(monkeypatch):
    from BasalSegSAMLib import processrunner

    calls = []
    monkeypatch.setattr(processrunner.sys, "platform", "win32")
    monkeypatch.setattr(processrunner.subprocess, "run", lambda *a, **k: calls.append((a, k)))
    processrunner.signalTree(type("P", (), {"pid": 4321})(), 15)
    (args, kwargs), = calls
    assert args[0] == ["taskkill", "/T", "/F", "/PID", "4321"]
    assert kwargs["creationflags"] & 0x08000000  # CREATE_NO_WINDOW
    assert processrunner.CREATE_NO_WINDOW == 0x08000000


@pytest.mark.parametrize("name, expected", [
    ("3: T1", "3_ T1"), ('a/b\\c|d?e*f"g<h>', "a_b_c_d_e_f_g_h_"), ("CON", "_CON"), ("nul.nii", "_nul.nii"),
    ("  ..", "volume"), ("MRHead", "MRHead"), ("T1 ", "T1"), ("tab\there", "tab_here"),
])
def test_export_names_are_valid_file_names_everywhere(name, expected):
    from BasalSegSAMLib.logic import exportFileName, safeFileName

    assert safeFileName(name) == expected
    assert exportFileName(name, "seg.nrrd") == expected + "_basalseg.seg.nrrd"
    with pytest.raises(ValueError, match="unknown export format"):
        exportFileName(name, "png")
