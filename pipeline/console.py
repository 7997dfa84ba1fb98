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
import codecs
import difflib
import json
import logging
import os
import re
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
    handler.addFilter(_ThirdPartyFilter(third_party))
    # a handler on the root logger also stops libraries' logging.basicConfig() from adding theirs
    root.addHandler(handler)
    # INFO reaches the handler so that our own lines relayed from worker processes can pass its filter
    root.setLevel(min(third_party, logging.INFO))
    own = logging.StreamHandler(stream)
    own.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
    for name in OWN_LOGGERS:
        log = logging.getLogger(name)
        log.handlers[:] = [own]
        log.setLevel(min(logging.INFO, getattr(logging, log_level)) if log_level else logging.INFO)
        log.propagate = False
    if third_party == QUIET:
        _quiet_loaded_libraries()


_ENTRY_MESSAGE = re.compile(r'^message: "(.*)"$', re.M)
_ENTRY_LOCATION = re.compile(r'^log_location: "([^"]*)"$', re.M)
_OWN_SOURCES = tuple(f"/{package}/" for package in OWN_LOGGERS[1:]) + ("/schemas/",)


def relayed_own_line(record: logging.LogRecord) -> str | None:
    """The message of one of our own log lines relayed from a worker process, else None.

    Beam's multi-process and portable runners relay each worker log record to
    the launcher as the text of a ``LogEntry`` on the root logger; the record's
    source file tells ours (pipeline/, encoders/, schemas/) from third-party ones.
    """
    text = record.msg if isinstance(record.msg, str) else ""
    if "log_location: " not in text:
        return None
    location, message = _ENTRY_LOCATION.search(text), _ENTRY_MESSAGE.search(text)
    if not location or not message or not any(s in location.group(1) for s in _OWN_SOURCES):
        return None
    try:  # protobuf text format: C-style escapes, non-ASCII as octal UTF-8 bytes
        return codecs.escape_decode(message.group(1).encode("latin-1", "backslashreplace"))[0].decode("utf-8")
    except (UnicodeDecodeError, ValueError):
        return message.group(1)


class _ThirdPartyFilter(logging.Filter):
    """Root handler: third-party records at ``level`` or above, and our own lines relayed from workers."""

    def __init__(self, level: int):
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self._level:
            return True
        own = relayed_own_line(record) if record.levelno >= logging.INFO else None
        if own is None:
            return False
        record.msg, record.args, record.name = own, (), "worker"
        return True


def worker_log_flags(argv: list[str], verbose: bool, log_level: str | None) -> list[str]:
    """Beam flags that keep worker processes (multi-processing, portable runners) as quiet as the launcher.

    Workers configure their own logging from the pipeline options: third-party
    loggers at ERROR, ours at INFO (their progress lines are relayed back).
    Flags the user gave win; ``--verbose`` / ``--log_level`` leave Beam's defaults.
    """
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if verbose or log_level:
        level = [] if log_level is None or "--default_sdk_harness_log_level" in given else [
            f"--default_sdk_harness_log_level={log_level}"]
        return level
    out = []
    if "--default_sdk_harness_log_level" not in given:
        out.append("--default_sdk_harness_log_level=ERROR")
    if "--sdk_harness_log_level_overrides" not in given:
        out.append("--sdk_harness_log_level_overrides=" + json.dumps({name: "INFO" for name in OWN_LOGGERS}))
    return out


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
