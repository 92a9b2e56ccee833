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


@pytest.mark.parametrize("home_in_temp", [False, True], ids=["home-as-is", "home-under-temp"])
def test_checkout_temp_dirs_and_installed_packages_are_allowed(tmp_path, monkeypatch, home_in_temp):
    import torch

    if home_in_temp:  # as on CI runners that set HOME=/tmp/...
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
    guard = FileAccessGuard(default_roots(CHECKOUT))
    inside = [os.path.join(CHECKOUT, "README.md"), str(tmp_path / "x"), torch.__file__, os.__file__,
              "/proc/self/status", "/etc/hostname"]
    if home_in_temp:
        inside.append(os.path.expanduser("~/.cache/x"))  # inside the temp dir: allowed like any temp file
    for path in inside:
        assert guard.allowed(path), path
    # a home directory outside the allowed roots, whatever HOME says, and data outside them
    for path in (OUTSIDE, "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
                 "/home/theseus-guard-probe/.cache/x", "/root/.cache/theseus-guard-probe"):
        assert not guard.allowed(path), path


def test_a_recorded_offence_fails_the_test(guard):
    guard.offences.append((OUTSIDE, "r"))
    with pytest.raises(pytest.fail.Exception, match="(?s)tmp_path.*theseus-guard-probe/words"):
        fail_on_outside_files(guard, "this test")
    fail_on_outside_files(guard, "this test")  # nothing left: passes
