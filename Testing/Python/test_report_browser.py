"""The cohort report in a real headless browser (Chromium).

The page is opened from ``file://`` with Chromium's ``--dump-dom``. A copy of ``report.html`` with a
small probe script appended (in the same folder, so relative links resolve the same way) records
what the browser actually rendered: table rows, flags, and how many ``<img>`` decoded
(``naturalWidth > 0``); it also ticks the "flagged scans only" filter and counts the rows left
visible. A screenshot checks that the page is not blank and shows the montages' colours.

Skipped when no Chromium binary is found (``$BASALSEG_CHROMIUM``, or ``chromium``,
``chromium-browser``, ``google-chrome`` on ``PATH``); on Debian: ``apt-get install -y chromium``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_report import COHORT, make_cohort


def _chromium() -> str | None:
    for name in (os.environ.get("BASALSEG_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (Debian: apt-get install -y chromium)")

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
          "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars"]

_PROBE = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
  var rows = Array.prototype.slice.call(document.querySelectorAll('#scans tbody tr'));
  var shown = function () { return rows.filter(function (r) { return getComputedStyle(r).display !== 'none'; }).length; };
  var result = {
    images: imgs.length,
    decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    widths: imgs.map(function (i) { return i.naturalWidth; }),
    rows: rows.map(function (r) { return r.dataset.scan; }),
    flagged: rows.filter(function (r) { return r.dataset.flags !== '0'; }).map(function (r) { return r.dataset.scan; }),
    flags: Array.prototype.slice.call(document.querySelectorAll('#scans li.flag')).map(function (li) { return li.className; }),
    failed: Array.prototype.slice.call(document.querySelectorAll('#failed tbody tr')).map(function (r) { return r.dataset.scan; }),
    shownBefore: shown()
  };
  document.getElementById('only-flagged').click();
  result.shownFiltered = shown();
  document.getElementById('only-flagged').click();
  result.shownAfter = shown();
  var pre = document.createElement('pre');
  pre.id = 'probe-result';
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=180, check=False)


def probe(page: Path, tmp_path: Path) -> dict:
    """Load ``page`` (a copy with the probe appended, next to it) and return what the probe saw."""
    html = page.read_text()
    probe_page = page.with_name("_probe_" + page.name)
    probe_page.write_text(html.replace("</body>", _PROBE + "</body>"))
    try:
        proc = _run(["--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()], tmp_path / "profile")
    finally:
        probe_page.unlink()
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"the probe did not run (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


@pytest.fixture(scope="module")
def cohort_report(tmp_path_factory) -> Path:
    from basalseg.report import build_report

    work = tmp_path_factory.mktemp("browser")
    out = make_cohort(work / "out", inputs=work / "inputs")
    build_report(out)
    return out


def _expected_flagged():
    return [name for name, (_, kinds) in COHORT.items() if kinds]


def test_report_renders_in_chromium(cohort_report, tmp_path):
    seen = probe(cohort_report / "report.html", tmp_path)
    assert seen["rows"] == list(COHORT)
    assert seen["images"] == len(COHORT) and seen["decoded"] == len(COHORT), seen["widths"]
    assert all(w >= 360 for w in seen["widths"])
    assert seen["flagged"] == _expected_flagged()
    kinds = sorted({c.split("flag-")[-1] for c in seen["flags"]})
    assert kinds == ["asymmetry", "disagreement", "missing", "outlier"]
    assert seen["failed"] == ["sub-09", "sub-10"]
    assert (seen["shownBefore"], seen["shownFiltered"], seen["shownAfter"]) == (8, len(_expected_flagged()), 8)


def test_probe_detects_a_missing_picture(cohort_report, tmp_path):
    """The decoded-image count is a real check: with one montage file gone, one image fails."""
    copy = tmp_path / "copy"
    shutil.copytree(cohort_report, copy)
    (copy / "report" / "sub-03.png").unlink()
    seen = probe(copy / "report.html", tmp_path)
    assert seen["images"] == len(COHORT) and seen["decoded"] == len(COHORT) - 1
    assert seen["widths"][list(COHORT).index("sub-03")] == 0


def test_embedded_report_is_self_contained(cohort_report, tmp_path):
    """--embed: report.html alone, copied away from its folder, still shows every picture."""
    from basalseg.report import build_report

    copy = tmp_path / "copy"
    shutil.copytree(cohort_report, copy)
    build_report(copy, embed=True)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(copy / "report.html", alone / "report.html")
    seen = probe(alone / "report.html", tmp_path)
    assert seen["images"] == seen["decoded"] == len(COHORT)


def test_report_screenshot_is_not_blank(cohort_report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = _run(["--window-size=1400,2400", f"--screenshot={shot}", (cohort_report / "report.html").as_uri()],
                tmp_path / "profile")
    assert shot.is_file(), proc.stderr[-2000:]
    keep = os.environ.get("BASALSEG_KEEP_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (2400, 1400)
    assert img.std() > 30, "blank page"
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    dark = (img.max(axis=2) < 60).mean()
    assert dark > 0.05, "no montage (dark pictures) on the page"
    magenta = (r > 150) & (g < 90) & (b > 100)  # putamen fill/outline in the montages
    badge_red = (r > 180) & (g < 40) & (b < 40)  # outlier badge
    assert magenta.sum() > 200 and badge_red.sum() > 20
