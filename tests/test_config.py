import subprocess
import sys
from pathlib import Path

import pytest

from fastvit_ssl.config import ConfigError, from_dict, load

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_recipe():
    cfg = load()
    assert (cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay) == ("adamw", 1.5e-4, 0.1)
    assert (cfg.moco.temperature, cfg.moco.momentum, cfg.moco.dim, cfg.moco.mlp_dim) == (0.2, 0.99, 256, 4096)
    assert (cfg.data.batch_size, cfg.optim.epochs, cfg.optim.warmup_epochs) == (4096, 300, 40)
    assert cfg.model.frozen_patch_embed


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  base_lr: 1.0e-3\n  name: lars\ndata:\n  batch_size: 64\n")
    cfg = load(path, ["optim.base_lr=1e-4", "model.frozen_patch_embed=false"])
    assert cfg.optim.base_lr == 1e-4  # the command line wins; "1e-4" (a YAML string) becomes a float
    assert cfg.optim.name == "lars" and cfg.data.batch_size == 64
    assert cfg.model.frozen_patch_embed is False
    assert cfg.run.name == "exp"  # the run folder is named after the config file
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.bse_lr=1e-3", "did you mean optim.base_lr"),
        ("optm.base_lr=1e-3", "did you mean optim"),
        ("data.batch_size=abc", "data.batch_size = 'abc' must be of type int"),
        ("data.batch_size=12.5", "must be of type int"),
        ("optim.base_lr=-0.1", "optim.base_lr must be positive"),
        ("optim.name=adam", "is not one of adamw, lars, lamb"),
        ("model.img_size=230", "multiple of vit_base's patch 16"),
        ("optim.warmup_epochs=400", "optim.warmup_epochs=400 must lie in [0, optim.epochs=300)"),
        ("optim.min_lr=1", "optim.min_lr=1 must lie in [0, optim.base_lr=0.00015]"),
        ("run.seed=-3", "run.seed must be a non-negative integer"),
        ("lr", "must look like section.key=value"),
        ("optim.base_lr.x=1", "must name section.key"),
    ],
)
def test_bad_values_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load(None, [override])
    assert message in str(err.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="section 'optim' must be a mapping"):
        load(bad)
    bad.write_text("optim:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match="did you mean optim.momentum"):
        load(bad)


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.bse_lr=1e-3"], "command line: unknown key optim.bse_lr; did you mean optim.base_lr?"),
        (["moco.temprature=0.1"], "command line: unknown key moco.temprature; did you mean moco.temperature?"),
        (  # a method's own check, before the demo data set is written
            ["--config", str(REPO / "configs" / "beit_demo.yaml"), "beit.tokenizer=dalle"],
            "beit.tokenizer=dalle needs beit.tokenizer_path=<DALL-E's encoder as safetensors>, got '': no such file. "
            "Convert OpenAI's released encoder.pkl once, as fastvit_ssl/tokenizer/dalle.py says, or use "
            "beit.tokenizer=trained",
        ),
    ],
)
def test_train_rejects_bad_config_before_any_work(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, f"run.out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if "tokenizer: dalle" in path.read_text():  # DALL-E's weights are the user's file: the recipe names none
        with pytest.raises(ConfigError, match="beit.tokenizer_path=<DALL-E's encoder"):
            load(path)
        cfg = load(path, ["beit.tokenizer=dalle_random"])
    else:
        cfg = load(path)
    assert cfg.run.name == path.stem


def test_a_run_folder_that_cannot_be_written_is_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"run.out_dir={blocker / 'runs'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: the run folder (run.out_dir/run.name) {blocker / 'runs' / 'demo'} cannot be written: {blocker} is "
        "not a folder; pass a folder you can write to"
    ]
    assert list(tmp_path.iterdir()) == [blocker]  # no demo data, no run folder
