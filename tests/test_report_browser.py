"""report.html in a real browser: headless Chromium renders an incremental sample run's report.

Asserts that every gallery image decoded (naturalWidth > 0), that the console
shows no errors, and that a catalog title holding ``<script>`` stayed text.
The report itself has no scripts; the checks run in a copy of it with a
test-only probe script injected first in <head>, read back with --dump-dom.
The unmodified report is screenshotted into the test's tmp_path (nothing
generated is committed). Skips only where chromium is not installed
(``.ci/run`` installs Debian's ``chromium``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.report.sample import sample_key
from tests.conftest import SAMPLE, run_sample_text_image

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=5000"]
EVIL_TITLE = "<script>window.pwned = 1</script> Espresso cup <b>bold</b>"
PROBE = """<script>
window.__probe = {errors: []};
window.addEventListener('error', function (e) {
  window.__probe.errors.push('error event: ' + (e.message || (e.target && (e.target.src || e.target.tagName))));
}, true);
['error', 'warn'].forEach(function (level) {
  var original = console[level];
  console[level] = function () { window.__probe.errors.push(level + ': ' + Array.from(arguments).join(' '));
                                 original.apply(console, arguments); };
});
window.addEventListener('load', function () {
  var images = Array.from(document.querySelectorAll('img.thumb'));
  var result = {
    images: images.length,
    undecoded: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                     .map(function (i) { return i.alt; }),
    pwned: typeof window.pwned !== 'undefined',
    scripts: document.querySelectorAll('script').length,
    evil_text_shown: document.body.textContent.indexOf('<script>window.pwned = 1<' + '/script>') >= 0,
    errors: window.__probe.errors
  };
  var out = document.createElement('pre');
  out.id = 'probe-result';
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def _evil_id(others: list[str]) -> str:
    """An item id whose sample key is below every sample item's: it is the gallery's first item."""
    floor = min(sample_key(i) for i in others)
    return next(f"evil-{n}" for n in range(100_000) if sample_key(f"evil-{n}") < floor)


def _catalog(folder: Path, rows: list[dict]) -> str:
    path = folder / "catalog.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(SAMPLE / "catalog.parquet")), path)
    return str(path)


@pytest.fixture(scope="module")
def incremental_report(tmp_path_factory, tiny_text_dir) -> Path:
    """Two runs: the sample plus an evil title and two bad images, then a night with changes."""
    folder = tmp_path_factory.mktemp("catalog")
    shutil.copytree(SAMPLE / "images", folder / "images")
    (folder / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = pq.read_table(SAMPLE / "catalog.parquet").to_pylist()
    extra = {"description": None, "audio_uri": None, "category": "Test", "price": 1.0, "lang": "en"}
    rows += [dict(extra, item_id=_evil_id([r["item_id"] for r in rows]), title=EVIL_TITLE,
                  image_uris=["images/coffee.jpg"]),
             dict(extra, item_id="bad-missing", title="Missing photo", image_uris=["images/missing.jpg"]),
             dict(extra, item_id="bad-corrupt", title="Corrupt photo", image_uris=["images/corrupt.jpg"])]
    out = tmp_path_factory.mktemp("out")
    allow = ("--max_failure_fraction", "0.2")  # the two bad photos are 5% of the rows, the default limit
    run_sample_text_image(out, "night1", tiny_text_dir, "--catalog", _catalog(folder, rows), *allow)
    changed = [dict(r, title=(r["title"] or "") + " (new edition)") if r["item_id"] in ("sku-0002", "sku-0003",
                                                                                         "sku-0005") else r
               for r in rows if r["item_id"] != "sku-0010"]
    changed.append(dict(extra, item_id="sku-new", title="A brand new item", image_uris=["images/rocket.jpg"]))
    run_dir = run_sample_text_image(out, "night2", tiny_text_dir, "--catalog", _catalog(folder, changed), *allow)
    return Path(run_dir)


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_renders_in_chromium_with_every_thumbnail_decoded_and_no_script_run(incremental_report, tmp_path):
    page = (incremental_report / "report.html").read_text()
    assert "<script" not in page.lower()
    manifest = json.loads((incremental_report / "manifest.json").read_text())
    assert manifest["counts"]["incremental"]["changed"] == 3
    timings = manifest["timings"]  # from the finished pipeline's Beam metrics
    assert {"read", "incremental", "fetch_decode", "encode", "fuse", "write", "index", "publish"} <= set(timings["stages"])
    assert timings["stages"]["read"]["items"] == manifest["counts"]["input_rows"] == 39
    assert timings["stages"]["encode"]["items"] > 0
    assert 0 < timings["encoder_busy_share"] < 1 and set(timings["encoders"]) == {"text", "image"}
    # night 2 fetched only new and changed items' photos: reused items' thumbnails were carried from night 1
    data = json.loads((incremental_report / "report" / "data.json").read_text())
    tiles = [t for item in data["gallery"]["items"] for t in [item, *item["neighbours"]]]
    with_photo = [t for t in tiles if "image" in t["modalities"]]
    assert with_photo and all("thumbnail" in t for t in with_photo), [t["item_id"] for t in with_photo]
    assert any(t["item_id"] not in ("sku-0002", "sku-0003", "sku-0005", "sku-new") for t in with_photo)
    assert data["drift"]["changed"] == 3 and sum(data["drift"]["histogram"]["counts"]) == 3

    shot = tmp_path / "report.png"
    plain = _chromium(f"--screenshot={shot}", "--window-size=1200,6000", "--hide-scrollbars",
                      (incremental_report / "report.html").as_uri(), cwd=tmp_path)
    assert shot.exists() and shot.stat().st_size > 20_000, plain.stderr[-2000:]
    # the page has no scripts, so any console line is something the browser complained about
    assert not re.findall(r":CONSOLE[^\n]*", plain.stderr), plain.stderr

    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    dumped = _chromium("--dump-dom", probe.as_uri(), cwd=tmp_path)
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', dumped.stdout, re.S)
    assert found, dumped.stderr[-3000:]
    result = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert result["images"] >= 8 and result["undecoded"] == [], result
    assert result["errors"] == [] and not re.findall(r":CONSOLE[^\n]*", dumped.stderr), (result, dumped.stderr)
    assert not result["pwned"] and result["scripts"] == 1 and result["evil_text_shown"], result
    if os.environ.get("CATALOG_INDEX_KEEP_SCREENSHOT"):  # for looking at it by hand
        shutil.copy(shot, os.environ["CATALOG_INDEX_KEEP_SCREENSHOT"])
