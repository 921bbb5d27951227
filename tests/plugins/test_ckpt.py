"""``rapid ckpt inspect`` (a builtin plugin command)."""

import pytest

from rapid.builtin.ckpt import inspect
from rapid.errors import UserError
from tests.core.test_checkpoint import _save


def test_inspect_reports_step_layout_and_verification(tmp_path):
    path, _ = _save(tmp_path, step=5)
    info = inspect(tmp_path / "ck")
    assert info["step"] == 5 and info["verified"].startswith("ok") and info["path"] == str(path)
    assert info["recipe"] == "[run]\n" and ".metadata" in info["files"]
    (path / "__0_0.distcp").write_bytes(b"x")
    assert inspect(path)["verified"].startswith("FAILED")
    with pytest.raises(UserError, match="neither a checkpoint"):
        inspect(tmp_path)
