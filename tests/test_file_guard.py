"""The guard that keeps tests inside the checkout, the temp dirs and the installed software."""

import os

import pytest

from _file_guard import FileAccessGuard, default_roots
from conftest import CHECKOUT, FILE_GUARD, fail_on_outside_files

# Nothing needs to exist there: the audit event comes before the file is looked up.
OUTSIDE = "/usr/share/theseus-guard-probe/words"


@pytest.fixture
def guard():
    return FileAccessGuard(default_roots(CHECKOUT))


@pytest.mark.skipif(FILE_GUARD is None, reason="THESEUS_FILE_GUARD=0 turned the guard off")
def test_a_read_outside_is_recorded_even_when_the_file_is_missing():
    with pytest.raises(FileNotFoundError):
        open(OUTSIDE)
    with pytest.raises(FileNotFoundError):
        os.open(OUTSIDE + "-2", os.O_RDONLY)
    assert [path for path, _ in FILE_GUARD.take()] == [OUTSIDE, OUTSIDE + "-2"]  # taken: this test passes
    assert FILE_GUARD.take() == []


def test_checkout_temp_dirs_and_installed_packages_are_allowed(guard, tmp_path):
    import torch

    for path in (os.path.join(CHECKOUT, "README.md"), str(tmp_path / "x"), torch.__file__, os.__file__,
                 "/proc/self/status", "/etc/hostname"):
        assert guard.allowed(path), path
    for path in (OUTSIDE, "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz", os.path.expanduser("~/.cache/x")):
        assert not guard.allowed(path), path


def test_a_recorded_offence_fails_the_test(guard):
    guard.offences.append((OUTSIDE, "r"))
    with pytest.raises(pytest.fail.Exception, match="(?s)tmp_path.*theseus-guard-probe/words"):
        fail_on_outside_files(guard, "this test")
    fail_on_outside_files(guard, "this test")  # nothing left: passes
