"""What the ``catalog-index`` command prints: quiet logging, one-line errors with a hint, exit codes.

* Exit codes: 0 done; 2 usage, configuration or input error (one line + a
  hint); 3 the run was not published (failure threshold, accounting); 1
  anything unexpected, which keeps its traceback.
* Third-party libraries (Beam, transformers, open_clip, torch warnings) are
  silent unless ``--verbose`` or ``--log_level`` asks for them; the run's own
  loggers (``catalog_index``, ``pipeline``, ``encoders``) keep INFO.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import warnings

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_NOT_PUBLISHED = 0, 1, 2, 3
OWN_LOGGERS = ("catalog_index", "encoders", "pipeline")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
QUIET = logging.CRITICAL + 1  # above every level: third-party records are dropped
# env switches read by third-party libraries at import time; set before any of them is imported
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


class UsageError(Exception):
    """An expected failure the user can fix: printed as one line and a hint, exit status 2."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class NotPublished(Exception):
    """The run finished but was refused publication: exit status 3."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (one line + hint) instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(message, f"{self.prog} --help lists the options")


def add_verbosity_args(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` / ``--log_level`` in a verb's help (the values are read by :func:`pop_verbosity`)."""
    g = parser.add_argument_group("terminal")
    g.add_argument("--verbose", action="store_true",
                   help="also show third-party warnings and progress bars (Beam, transformers, open_clip)")
    g.add_argument("--log_level", default=None, choices=LOG_LEVELS, help="level for every library's log messages")


def pop_verbosity(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """Takes ``--verbose`` and ``--log_level X`` out of ``argv`` (they are not Beam options)."""
    pre = Parser(add_help=False, allow_abbrev=False, prog="catalog-index")
    add_verbosity_args(pre)
    args, rest = pre.parse_known_args(argv)
    return rest, args.verbose, args.log_level


def configure_logging(verbose: bool = False, log_level: str | None = None, stream=None) -> None:
    """Our loggers at INFO; third-party ones silent unless asked for (verbose: WARNING and their bars)."""
    stream = stream or sys.stderr
    third_party = getattr(logging, log_level) if log_level else (logging.WARNING if verbose else QUIET)
    if third_party == QUIET:
        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)
        warnings.simplefilter("ignore")  # torch / transformers deprecation notes
    logging.captureWarnings(True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_catalog_index", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler._catalog_index = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    # a handler on the root logger also stops libraries' logging.basicConfig() from adding theirs
    root.addHandler(handler)
    root.setLevel(third_party)
    own = logging.StreamHandler(stream)
    own.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
    for name in OWN_LOGGERS:
        log = logging.getLogger(name)
        log.handlers[:] = [own]
        log.setLevel(min(logging.INFO, getattr(logging, log_level)) if log_level else logging.INFO)
        log.propagate = False
    if third_party == QUIET:
        _quiet_loaded_libraries()


def redirect_own_logs(stream) -> None:
    """Points the run's own log handlers at ``stream`` (the progress bar's, so lines do not cut through it)."""
    for name in OWN_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(stream)


def _quiet_loaded_libraries() -> None:
    """Libraries that keep their own verbosity switch, if already imported (tests import them first)."""
    tf_logging = sys.modules.get("transformers.utils.logging")
    if tf_logging is not None:
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None and hasattr(hub, "disable_progress_bars"):
        hub.disable_progress_bars()


def report(error: UsageError | NotPublished, stream=None) -> int:
    """Prints an expected failure as ``error: ...`` and ``hint: ...``; returns its exit status."""
    stream = stream or sys.stderr
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"error: {first}", file=stream, flush=True)
    if error.hint:
        print(f"hint: {error.hint}", file=stream, flush=True)
    return EXIT_NOT_PUBLISHED if isinstance(error, NotPublished) else EXIT_USAGE


def unknown_flags(argv: list[str], known: list[str]) -> tuple[list[str], list[str]]:
    """Splits ``argv``'s unrecognized flags into likely typos of ``known`` ones, and the rest.

    A typo (``--image_colum``) is an error: Beam would drop it with a warning and
    the run would silently use the default. Other unknown flags may be meant for a
    runner (Dataflow forwards them), so they are only named.
    """
    typos, others = [], []
    for arg in argv:
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        if name in known:
            continue
        (typos if difflib.get_close_matches(name, known, n=1, cutoff=0.8) else others).append(name)
    return typos, others


def closest_flag(name: str, known: list[str]) -> str | None:
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return match[0] if match else None
