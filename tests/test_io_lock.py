"""FolderLock: one holder at a time, the holder named, released on close."""

from __future__ import annotations

import os

import pytest

from fedseg.errors import FedsegError
from fedseg.io import LOCK_FILE, FolderLock


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    with FolderLock(tmp_path / "run", "fedseg server"):
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(FedsegError, match=rf"in use by another fedseg server \(pid {os.getpid()}\)"):
            FolderLock(tmp_path / "run", "fedseg server").acquire()
    with FolderLock(tmp_path / "run"):  # released: free again (the stale file does not block)
        pass
