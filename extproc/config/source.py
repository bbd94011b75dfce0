"""The configuration file as a source: each content judged once, one reload
at a time, the last content read in force.

The only place that reads MIRROR_CONFIG. What watches it (the folder, a
Kubernetes ConfigMap's ``..data`` swaps, SIGHUP) and on which thread lives in
the shell (``extproc.watch``); what a new content means is the consumer's
``Judge``: the sampler's policy store, or ``up --inline``'s route reloader.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..core.policy import Policy
from .build import build_policy
from .errors import ConfigError
from .settings import Settings


class ConfigFile(Protocol):
    """Where a source's file is: ``Settings`` (MIRROR_CONFIG), or another
    consumer's file (``compare capture``'s settings)."""

    @property
    def config(self) -> str: ...


# The most of the MIRROR_CONFIG file read: 16 MiB. A ConfigMap holds at most
# 1 MiB, and a generated file of thousands of routes a few MiB; parsed YAML
# takes several times its size in memory, so a larger file is a mistake
# (a log, an image, /dev/zero) that would cost the process its memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_manifest(settings: ConfigFile, *, once: bool = False) -> str | None:
    """The MIRROR_CONFIG file's text (None in simple mode, which has no file);
    ``once``: see ``read_config_file``."""
    if not settings.config:
        return None
    return read_config_file(settings.config, "MIRROR_CONFIG", once=once)


def read_config_file(path: str, setting: str, *, once: bool = False) -> str:
    """A configuration file's text, at most MAX_CONFIG_BYTES; ConfigError
    names ``setting`` (the variable or flag that named the file).

    What a process reads again and again (a server's start and every reload,
    ``once`` False) must be a regular file (symlinks followed): a FIFO would
    block the read (start-up, or the reload thread) until something writes to
    it, and a device need never end. A command that reads it once
    (check-config, envoy-config, a report: ``once``) also takes a pipe or a
    character device, as a shell gives one (``--config <(...)``,
    ``/dev/stdin``), still within the bound."""
    try:
        # Newlines as a text-mode read has them (as Path.read_text did).
        return _read_file(path, once).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except (OSError, _NotAFile, UnicodeDecodeError) as e:
        raise ConfigError([f"{setting}: cannot read {path}: {e}"]) from None


class _NotAFile(Exception):
    """What is at the path is no configuration file to read."""


def _read_file(path: str, once: bool) -> bytes:
    # Looked at before it is opened (opening some devices does something).
    _check_readable(os.stat(path), once)
    if once:
        with open(path, "rb") as file:  # a pipe blocks until its writer writes: what the command was given
            data = file.read(MAX_CONFIG_BYTES + 1)
    else:
        # And again once open, without blocking, in case it was swapped meanwhile.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as file:
            _check_readable(os.fstat(fd), once)
            data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise _NotAFile(f"larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB, the most a configuration file may hold")
    return data


def _check_readable(status: os.stat_result, once: bool) -> None:
    mode = status.st_mode
    if stat.S_ISREG(mode) or (once and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode))):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "of another kind")
    raise _NotAFile(f"not a regular file ({kind})" if not once else f"not a file to read ({kind})")


def load_policy(settings: Settings) -> Policy:
    """The policy these settings describe; ConfigError lists every problem."""
    return build_policy(settings, read_manifest(settings))


def content_digest(text: str | None) -> bytes:
    """What identifies one content of the configuration file (judged once each)."""
    return hashlib.sha256((text or "").encode()).digest()


def touches(changes: Iterable[tuple[object, str]], config: Path) -> bool:
    """Whether watchfiles ``changes`` in the config file's folder concern the
    file: the file itself (written, or replaced by an editor's rename), or a
    Kubernetes ConfigMap's atomic swap of its ``..data`` symlink, through which
    the (unresolved) path points at the new content.

    Full paths are compared, not names: ``config`` as the watch was given
    its folder (``ConfigSource.path``: absolute, symlinks not resolved), which
    is how watchfiles reports the paths under it. A file of the same name in
    another folder does not concern it."""
    folder = config.parent
    for _, path in changes:
        changed = Path(path)
        if changed == config or (changed.parent == folder and changed.name.startswith("..data")):
            return True
    return False


class Judge(Protocol):
    """What a consumer does with the source's contents."""

    def judge(self, text: str | None, reason: str) -> None:
        """A content not judged before: put it in force, or raise ConfigError
        (or report why not itself). Never called twice for one content."""

    def unchanged(self, reason: str) -> None:
        """A reload found the content already judged."""

    def rejected(self, reason: str, problems: list[str]) -> None:
        """The file could not be read, or ``judge`` raised ConfigError."""

    def failed(self, reason: str, error: Exception) -> None:
        """A bug: called from the except block (the traceback is at hand)."""


@dataclass(frozen=True)
class _Request:
    reason: str
    quiet: bool

    def then(self, later: _Request) -> _Request:
        # Two requests become one reload: the later reason, counted unless both are quiet.
        return _Request(later.reason, self.quiet and later.quiet)


class ConfigSource:
    """``settings.config`` as a series of contents for one ``Judge``.

    Reloads run one at a time: a reload requested while another runs returns
    at once and the running one reads the file again when it is done, so the
    content judged last is the content read last, and a burst of requests
    (SIGHUPs, events) costs at most one more read.
    """

    def __init__(
        self, settings: ConfigFile, judge: Judge, built_from: str | None, read: Callable[[ConfigFile], str | None] = read_manifest
    ) -> None:
        """``built_from``: the text the consumer's state was built from at
        start-up (judged already: a later edit must not pass for it)."""
        self.settings = settings
        self.judge = judge
        self._read = read
        self._judged = content_digest(built_from)
        self._guard = threading.Lock()
        self._running = False
        self._pending: _Request | None = None

    @property
    def path(self) -> Path | None:
        return Path(self.settings.config).absolute() if self.settings.config else None

    def reload(self, reason: str, quiet: bool = False) -> None:
        """Read the file and judge its content if it is new; ``quiet``: an
        unchanged content is not reported. Never raises."""
        request = _Request(reason, quiet)
        with self._guard:
            self._pending = request if self._pending is None else self._pending.then(request)
            if self._running:
                return  # the running reload reads again for this request
            self._running = True
        try:
            while True:
                with self._guard:
                    latest, self._pending = self._pending, None
                    if latest is None:
                        self._running = False
                        return
                self._judge_content(latest)
        except BaseException:
            with self._guard:
                self._running = False
            raise

    def _judge_content(self, request: _Request) -> None:
        try:
            text = self._read(self.settings)
            digest = content_digest(text)
            if digest == self._judged:
                if not request.quiet:
                    self.judge.unchanged(request.reason)
                return
            self._judged = digest
            self.judge.judge(text, request.reason)
        except ConfigError as e:
            self.judge.rejected(request.reason, e.problems)
        except Exception as e:  # a bug must not end reloading, nor the process
            self.judge.failed(request.reason, e)
