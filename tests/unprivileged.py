"""Run test code as an unprivileged user, so that ``chmod 000`` really stops reads.

The tests run as root, and root reads any file. A child Python process imports what it needs
as root (the interpreter lives under ``/root``, and a checkout may sit in a private directory,
which ``nobody`` cannot enter), then drops to ``nobody`` and runs the test code. The files it
reads must sit in a world-readable directory (pytest's ``tmp_path`` is private to root): use
:func:`public_dir`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]

_PRELUDE = """\
import importlib, os, pwd, sys
for module in {modules!r}:
    importlib.import_module(module)
if "PIL.Image" in sys.modules:  # PIL imports its format plugins on first use: do it as root
    sys.modules["PIL.Image"].init()
{as_root}
if os.geteuid() == 0:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
"""


@contextmanager
def public_dir() -> Iterator[Path]:
    """A temporary directory that every user can read."""
    path = Path(tempfile.mkdtemp(prefix="salmix-test-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


def run_unprivileged(code: str, modules: tuple[str, ...], timeout: float = 120,
                     as_root: str = "") -> subprocess.CompletedProcess:
    """Run ``code`` in a child Python that imports ``modules``, then drops root to ``nobody``.

    ``as_root``: code run before dropping root, e.g. to start helper processes (such as
    multiprocessing's resource tracker) that ``nobody`` could not launch.
    """
    prelude = _PRELUDE.format(modules=modules, as_root=as_root)
    return subprocess.run([sys.executable, "-c", prelude + code],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
