import os
import stat

import pytest
import torch

from nascore.io import CheckpointError, OutputError, load_checkpoint, save_checkpoint, write_json, write_text


def test_atomic_write_replaces_and_uses_the_umask_mode(tmp_path):
    path = tmp_path / "out" / "a.json"
    write_json(path, {"x": 1})
    write_json(path, {"x": 2})
    assert path.read_text().strip().endswith("}") and '"x": 2' in path.read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]      # no temp files left


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    write_text(path, "good")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OutputError, match="disk full"):
        write_text(path, "partial")
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    # (the tests run as root, so a read-only mode would not stop a write: a file in the way does)
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(OutputError, match="cannot write .*taken/x.txt"):
        write_text(tmp_path / "taken" / "x.txt", "y")


def test_checkpoint_schema_and_code_refusal(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.ones(2)}, kind="search", meta={"method": "darts"})
    assert torch.equal(load_checkpoint(path, kind="search", meta={"method": "darts"})["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="'search' checkpoint, expected 'train'"):
        load_checkpoint(path, kind="train")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    torch.save({"nascore_checkpoint": 1, "kind": "search", "meta": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="holds Python objects beyond tensors.*never loads such a file") as e:
        load_checkpoint(path, kind="search")
    assert "weights_only" not in str(e.value)       # torch's advice to load it unsafely is not passed on
    assert not (tmp_path / "pwned").exists()
    torch.save({"some": "dict"}, path)
    with pytest.raises(CheckpointError, match="not a nascore checkpoint"):
        load_checkpoint(path, kind="search")
