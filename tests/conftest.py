"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private ``$VSEKIT_CACHE`` (demo sets, LSA vectors) for one test module."""
    root = tmp_path_factory.mktemp("vsekit-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("VSEKIT_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def mp():
    """A module-wide MonkeyPatch with torch on one thread (tiny models, one-query calls: a second thread
    only adds contention)."""
    m = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield m
    torch.set_num_threads(threads)
    m.undo()
