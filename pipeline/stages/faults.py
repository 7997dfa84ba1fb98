"""Test-only fault injection: make a named point of the pipeline fail, to test recovery.

Set ``CATALOG_INDEX_FAULT=<point>:<action>:<marker file>``; it does nothing
unless set. Actions:

* ``raise_once``: the first time any process reaches ``point`` it creates the
  marker file and raises :class:`InjectedFault`; later attempts (a runner
  retrying the bundle) find the marker and go on. The marker makes "first"
  hold across retries, threads and worker processes.
* ``exit``: the process dies on the spot (``os._exit``), as if killed, after
  creating the marker (so a test can tell that the point was reached).

Points: ``decode`` (a chunk of images reaches a decoding process, ``--decode_processes``), ``fuse`` (an
item's record has been emitted), ``write_shard`` (a shard's temporary file is written, not yet renamed),
``publish_manifest`` (all shards written, manifest not yet), ``publish_latest`` (manifest written, LATEST
not yet).
"""
from __future__ import annotations

import os

ENV = "CATALOG_INDEX_FAULT"
POINTS = ("decode", "fuse", "write_shard", "publish_manifest", "publish_latest")
ACTIONS = ("raise_once", "exit")


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


def spec() -> str | None:
    """This process's setting, to hand to a process started earlier (a decoding process keeps the
    environment of the fork server it came from)."""
    return os.environ.get(ENV) or None


def inject(point: str, setting: str | None = None) -> None:
    """Fails here if the environment (or ``setting``, see :func:`spec`) asks for a fault at ``point``;
    otherwise a no-op."""
    spec = setting or os.environ.get(ENV)
    if not spec:
        return
    want, action, marker = spec.split(":", 2)
    if want != point:
        return
    if action not in ACTIONS or want not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: point must be one of {POINTS}, action one of {ACTIONS}")
    try:
        # O_EXCL: exactly one attempt anywhere wins the right to fail
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    if action == "exit":
        os._exit(137)
    raise InjectedFault(f"injected fault at {point} (first attempt)")
