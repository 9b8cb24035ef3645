"""Shared test set-up: no test reaches the network, and notebook tests skip without their data.

- In this process, an autouse fixture refuses connections to anything but the local machine
  (`local_only`), for every test.
- Notebook kernels (nbval, papermill) are separate processes: they start with IPYTHONDIR set to
  a fresh directory whose start-up file installs the same guard, so a notebook that tried to
  download would fail instead of reaching the network. (A fresh IPython directory also keeps a
  user's IPython configuration out of the tests.)
- Chapter notebooks (`book/ch*.ipynb`, collected by nbval through `testpaths`) get the marker
  `notebook`; when the datasets a chapter loads are neither cached nor in a directory mirror
  (`TEACHREG_DATA_MIRROR`), its tests are skipped with the reason, instead of downloading.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import notebook_tools
import pytest

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

GUARD = f"""
# Installed by tests/conftest.py: the notebook tests must not reach the network.
import socket as _socket

_real_getaddrinfo = _socket.getaddrinfo


def _local_only(host, *args, **kwargs):
    if host not in {LOCAL_HOSTS!r}:
        raise OSError(f"a notebook under test tried to reach the network ({{host}})")
    return _real_getaddrinfo(host, *args, **kwargs)


_socket.getaddrinfo = _local_only
"""


def pytest_configure(config):
    ipython_dir = Path(tempfile.mkdtemp(prefix="teachreg-ipython-"))
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-no-network.py").write_text(GUARD, encoding="utf-8")
    config._teachreg_ipython_dir = (ipython_dir, os.environ.get("IPYTHONDIR"))
    os.environ["IPYTHONDIR"] = str(ipython_dir)


def pytest_unconfigure(config):
    ipython_dir, previous = getattr(config, "_teachreg_ipython_dir", (None, None))
    if ipython_dir is None:
        return
    if previous is None:
        os.environ.pop("IPYTHONDIR", None)
    else:
        os.environ["IPYTHONDIR"] = previous
    shutil.rmtree(ipython_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """Refuse connections beyond the local machine (name lookups of other hosts fail)."""
    real_getaddrinfo = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            raise OSError(f"test tried to reach the network ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    """Mark nbval's cells of chapter notebooks; skip them when the chapter's data are missing."""
    reasons: dict[Path, str | None] = {}
    for item in items:
        path = Path(str(item.path))
        if path.suffix != ".ipynb":
            continue
        item.add_marker(pytest.mark.notebook)
        if path not in reasons:
            reasons[path] = notebook_tools.missing_data(path)
        if reasons[path]:
            item.add_marker(pytest.mark.skip(reason=reasons[path]))
