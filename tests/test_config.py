"""The run configuration: YAML + --set overrides, type coercion, errors that name file and field."""

import textwrap

import pytest

from magface.config import Config, ConfigError
from magface.losses import feasible_lambda_g_min

REPO_CONFIGS = ["configs/demo.yaml", "configs/ms1mv2_r100_magface.yaml", "configs/ms1mv2_r50_arcface.yaml",
                "configs/ms1mv2_r100_magface_finetune.yaml"]


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_paper_recipe_file_holds_the_paper_numbers():
    from tests.conftest import REPO

    cfg = Config.load(REPO / "configs/ms1mv2_r100_magface.yaml")
    assert (cfg.scaling.num_workers, cfg.train.batch_size, cfg.global_batch_size) == (8, 64, 512)
    assert cfg.train.epochs == 25 and cfg.optim.milestones == [10, 18, 22] and cfg.optim.schedule == "step"
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert (cfg.data.num_classes, cfg.data.num_images) == (85742, 5822653)
    l = cfg.loss
    assert (l.kind, l.s, l.l_a, l.u_a, l.l_m, l.u_m, l.lambda_g) == ("magface", 64, 10, 110, 0.45, 0.8, 35)
    assert l.easy_margin  # the official MagLinear's default, never overridden by the official training
    assert cfg.model.backbone == "iresnet100" and cfg.scaling.use_gpu


def test_finetune_preset_holds_the_official_readme_numbers():
    from tests.conftest import REPO

    cfg = Config.load(REPO / "configs/ms1mv2_r100_magface_finetune.yaml")
    l = cfg.loss
    assert (l.kind, l.l_a, l.u_a, l.l_m, l.u_m, l.lambda_g, l.easy_margin) == ("magface", 1, 51, 0.45, 1, 5, True)
    assert l.lambda_g >= feasible_lambda_g_min(l.s, l.l_a, l.u_a, l.l_m, l.u_m) and not l.allow_infeasible
    assert cfg.model.init_from and cfg.model.resolved_feature_scale(l)


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_repo_configs_load(path):
    from tests.conftest import REPO

    cfg = Config.load(REPO / path)
    # the dict form round-trips (it is what Ray ships to the workers)
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_overrides_are_coerced_to_the_declared_types(tmp_path):
    p = write(tmp_path, """
        data: {num_classes: 10}
        train: {epochs: 3}
    """)
    cfg = Config.load(p, ["optim.lr=1e-2", "train.epochs=7", "optim.milestones=[2,4]", "train.amp=bf16",
                          "model.sync_bn=true", "optim.warmup_epochs=1", "train.max_steps_per_epoch=none",
                          "data.train=a.rec,b.rec", "loss.s=32"])
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.milestones == [2, 4] and cfg.model.sync_bn is True
    assert cfg.optim.warmup_epochs == 1.0 and isinstance(cfg.optim.warmup_epochs, float)
    assert cfg.train.max_steps_per_epoch is None and cfg.data.train == ["a.rec", "b.rec"]
    assert cfg.loss.s == 32.0


def test_unknown_key_names_file_and_lists_valid_keys(tmp_path):
    p = write(tmp_path, """
        data: {num_classes: 10}
        optim: {learning_rate: 0.1}
    """)
    with pytest.raises(ConfigError) as e:
        Config.load(p)
    msg = str(e.value)
    assert str(p) in msg and "learning_rate" in msg and "'lr'" in msg and "'momentum'" in msg
    with pytest.raises(ConfigError, match="unknown key.*'trian'.*valid keys"):
        Config.load(write(tmp_path, "trian: {epochs: 1}\n", "b.yaml"))
    with pytest.raises(ConfigError, match="--set loss.lamda_g=40: unknown key.*lamda_g.*lambda_g"):
        Config.load(write(tmp_path, "data: {num_classes: 3}\n", "c.yaml"), ["loss.lamda_g=40"])
    # a sweep's `tune:` section rides along in the same file and is left to pipelines/tune.py
    cfg = Config.load(write(tmp_path, "data: {num_classes: 3}\ntune: {num_samples: 8}\n", "d.yaml"))
    assert cfg.data.num_classes == 3


def test_wrong_types_name_the_field(tmp_path):
    p = write(tmp_path, "data: {num_classes: 10}\ntrain: {epochs: many}\n")
    with pytest.raises(ConfigError, match=f"{p}.*train.epochs expects int.*'many'"):
        Config.load(p)
    with pytest.raises(ConfigError, match="train.epochs expects int, got 2.5"):
        Config.load(write(tmp_path, "data: {num_classes: 10}\ntrain: {epochs: 2.5}\n", "b.yaml"))
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        Config.load(p, ["epochs=3"])


def test_infeasible_lambda_g_is_refused_with_the_bound(tmp_path):
    p = write(tmp_path, "data: {num_classes: 10}\nloss: {lambda_g: 20}\n")
    bound = feasible_lambda_g_min(64, 10, 110, 0.45, 0.8)
    with pytest.raises(ConfigError) as e:
        Config.load(p)
    assert str(p) in str(e.value) and "lambda_g" in str(e.value) and f"{bound:.4f}" in str(e.value)
    # the same file is accepted once lambda_g clears the bound, or with a smaller scale s
    assert Config.load(p, [f"loss.lambda_g={bound + 0.01}"]).loss.lambda_g == pytest.approx(bound + 0.01)
    assert Config.load(p, ["loss.s=32"]).loss.lambda_g == 20


@pytest.mark.parametrize("override, match", [
    ("train.amp=fp8", "train.amp"),
    ("optim.schedule=cosine", "optim.schedule"),
    ("optim.milestones=[18,10]", "milestones must be increasing"),
    ("data.pixel_convention=bgr01", "pixel_convention"),
    ("model.sample_rate=0", "sample_rate"),
    ("scaling.num_workers=0", "num_workers"),
    ("train.fault_kill_rank=1", "fault_kill_step"),
    ("data.num_classes=0", "num_classes"),
])
def test_bad_values_are_refused(tmp_path, override, match):
    p = write(tmp_path, "data: {num_classes: 10}\n")
    with pytest.raises(ConfigError, match=match):
        Config.load(p, [override])


def test_unreadable_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        Config.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        Config.load(write(tmp_path, "data: {num_classes: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        Config.load(write(tmp_path, "- 1\n- 2\n", "list.yaml"))
