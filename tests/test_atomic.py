"""The one atomic writer: outputs follow the umask like any file; secrets are private from the first byte."""

from __future__ import annotations

import os
import stat

import pytest

from fedrad.common.atomic import atomic_write, atomic_write_bytes


def test_atomic_outputs_follow_the_umask_and_secrets_stay_private(tmp_path):
    old = os.umask(0o022)
    try:
        plain = atomic_write_bytes(tmp_path / "plot.png", b"x")
        secret = atomic_write_bytes(tmp_path / "site.key", b"k", mode=0o600)
        os.umask(0o077)
        private = atomic_write_bytes(tmp_path / "under-077.txt", b"y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o644
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = atomic_write_bytes(tmp_path / "metrics.json", b"old")

    def broken(p):
        p.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
