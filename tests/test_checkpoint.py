import pickle

import pytest
import torch

from fastvit_ssl import checkpoint
from fastvit_ssl.checkpoint import CheckpointError


def test_save_is_atomic(tmp_path, monkeypatch):
    path = checkpoint.path_for(tmp_path, 5)
    checkpoint.save(path, {"step": 5, "w": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000005.pt", "ckpt-00000005.pt.sha256", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-00000005.pt"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed half-way through the write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"step": 6})
    assert checkpoint.load(path)["step"] == 5  # the previous file is untouched
    assert checkpoint.list_checkpoints(tmp_path) == [path]  # the torn temporary file is never listed


def test_damage_is_detected_by_size_and_checksum(tmp_path):
    path = checkpoint.save(checkpoint.path_for(tmp_path, 1), {"w": torch.arange(100.0)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        checkpoint.load(path)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match="size differs"):
        checkpoint.load(path)


def test_a_checkpoint_without_its_checksum_file_is_incomplete(tmp_path):
    path = checkpoint.save(checkpoint.path_for(tmp_path, 1), {"step": 1})
    checkpoint.checksum_path(path).unlink()  # as if killed between the two writes
    (tmp_path / ".ckpt-00000002.pt.tmp").write_bytes(b"half")
    assert checkpoint.list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.verify(path)
    checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # the leftovers are cleaned up


def test_list_and_prune(tmp_path):
    for step in (30, 10, 20, 40):
        checkpoint.save(checkpoint.path_for(tmp_path, step), {"step": step})
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt-00000010.pt",
        "ckpt-00000020.pt",
        "ckpt-00000030.pt",
        "ckpt-00000040.pt",
    ]
    checkpoint.prune(tmp_path, keep_last=2)
    assert [checkpoint.load(p)["step"] for p in checkpoint.list_checkpoints(tmp_path)] == [30, 40]


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_loading_refuses_pickled_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"step": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load(path)
    assert "arbitrary code ran" not in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    a = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_incompatible_config_names_the_difference(tmp_path):
    stored = {"model": {"arch": "vit_small", "img_size": 224}, "moco": {"dim": 256}}
    current = {"model": {"arch": "vit_base", "img_size": 224}, "moco": {"dim": 256}}
    with pytest.raises(CheckpointError, match="model.arch: checkpoint 'vit_small', this run 'vit_base'"):
        checkpoint.check_compatible(stored, current, tmp_path / "c.pt")
    checkpoint.check_compatible(current, current, tmp_path / "c.pt")
