"""A guard that tests read and write only the checkout, temp dirs and installed software.

A test that opens `/usr/share/datasets/...` passes on the machine where someone once ran
`apt-get install` and fails on a fresh one. `sys.addaudithook` sees every `open` (builtins.open,
io.open, os.open, imports' open_code) in this process before the file is touched, so the guard
records such a path even when the file does not exist. conftest.py installs it for the session
and fails the test during which an outside path was opened.

Allowed: the checkout; the temp dir (pytest's tmp_path lives there); the Python installation
(sys.prefix, the venv, site-packages, stdlib, every sys.path entry); /proc, /sys, /dev; /etc
(libraries' configuration); the shared libraries and fonts that installed packages load
(/usr/lib*, /lib*, /usr/local/lib, /usr/share/fonts, /usr/share/zoneinfo). Everything else is
outside: any other data (e.g. /usr/share/datasets) and the home directory's caches (conftest
points HF_HOME, XDG_CACHE_HOME, MPLCONFIGDIR and TORCH_HOME into a temp dir, so no test reads a
cache filled by hand). "Outside" is decided by these roots alone, not by where HOME is: on a CI
runner that sets HOME=/tmp/..., ~/.cache is inside the temp dir and allowed like any temp file.
Subprocesses a test starts are not watched.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import tempfile
import threading
from typing import Iterable, List, Tuple

SYSTEM_SOFTWARE = ("/proc", "/sys", "/dev", "/etc", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libexec", "/lib",
                   "/lib64", "/usr/local/lib", "/usr/share/fonts", "/usr/share/zoneinfo")


# Too broad to allow whole: a system Python's prefix is /usr, which holds /usr/share/datasets too.
TOO_BROAD = ("/", "/usr", "/usr/local", "/usr/share", "/opt", "/var", "/srv", "/home", "/root")


def default_roots(checkout: str) -> List[str]:
    """The allowed roots for a run from `checkout`: the Python installation's own directories
    (prefix, stdlib, site-packages, sys.path) unless one is as broad as /usr or home."""
    python = [sys.prefix, sys.exec_prefix, *sysconfig.get_paths().values(), *site.getsitepackages(),
              site.getusersitepackages(), *(p for p in sys.path if os.path.isabs(p))]
    broad = {os.path.realpath(p) for p in (*TOO_BROAD, os.path.expanduser("~"))}  # HOME as it is now
    return [checkout, tempfile.gettempdir(), *SYSTEM_SOFTWARE,
            *(p for p in python if p and os.path.realpath(p) not in broad)]


class FileAccessGuard:
    """Records every opened path outside `roots` (absolute, symlinks resolved) as (path, mode)."""

    def __init__(self, roots: Iterable[str]):
        self.roots = tuple(sorted({self._canonical(r).rstrip(os.sep) + os.sep for r in roots}))
        self.offences: List[Tuple[str, str]] = []
        self._busy = threading.local()

    @staticmethod
    def _canonical(path: str) -> str:
        return os.path.realpath(os.path.abspath(path))

    def allowed(self, path: str) -> bool:
        for candidate in (os.path.abspath(path), None):
            if candidate is None:  # only when the cheap check failed: resolve links (/tmp -> /private/tmp)
                candidate = self._canonical(path)
            if (candidate + os.sep).startswith(self.roots):
                return True
        return False

    def hook(self, event: str, args: tuple) -> None:
        if event != "open" or getattr(self._busy, "on", False):
            return
        path, mode = args[0], args[1]
        if not isinstance(path, (str, bytes, os.PathLike)):
            return  # a file descriptor: its path was checked when it was opened
        self._busy.on = True  # the checks below must not audit themselves
        try:
            path = os.fsdecode(path)
            if not self.allowed(path):
                self.offences.append((os.path.abspath(path), str(mode)))
        finally:
            self._busy.on = False

    def take(self) -> List[Tuple[str, str]]:
        """The offences recorded since the last call, and forget them."""
        taken, self.offences = self.offences, []
        return taken

    def install(self) -> "FileAccessGuard":
        sys.addaudithook(self.hook)  # audit hooks cannot be removed: install once per process
        return self
