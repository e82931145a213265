"""Config precedence (profile < YAML < flags < --set) and validation messages."""

from __future__ import annotations

import pytest

from surfaceinspect.config import list_profiles, parse_set_option
from surfaceinspect.errors import ConfigError
from surfaceinspect.profiles import resolve_run_config


def test_profile_then_yaml_then_flags_then_set(toy_method, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("method: toy\ncommon:\n  batch_size: 2\n  seed: 5\ntoy:\n  epochs: 3\n")
    # profile alone
    run = resolve_run_config(method="toy", profile="cpu")
    assert (run.common.image_size, run.common.batch_size, run.method_config.epochs) == (64, 4, 2)
    # YAML overrides the profile
    run = resolve_run_config(method="toy", profile="cpu", config_file=cfg_file)
    assert (run.common.batch_size, run.common.seed, run.method_config.epochs) == (2, 5, 3)
    # flags override YAML, --set overrides flags
    run = resolve_run_config(
        method=None,
        profile="cpu",
        config_file=cfg_file,
        common_flags={"batch_size": 6, "seed": None},
        method_flags={"epochs": 7},
        sets=["toy.epochs=9"],
    )
    assert (run.method, run.common.batch_size, run.common.seed, run.method_config.epochs) == ("toy", 6, 5, 9)
    # nested common flags
    run = resolve_run_config(method="toy", profile="cpu", common_flags={"calibration.fraction": 0.3})
    assert run.common.calibration.fraction == 0.3


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["common.image_size=8"], "common.image_size=8"),
        (["common.batch_size=0"], "batch_size"),
        (["common.imgsize=64"], "unknown setting common.imgsize"),
        (["toy.epochs=two"], "toy.epochs: expected a whole number"),
        (["common.device=gpu"], "use auto, cpu, cuda"),
        (["common.calibration.false_reject_rate=0.7"], "false_reject_rate"),
        (["bogus.x=1"], "unknown config section 'bogus'"),
    ],
)
def test_validation_messages_name_key_and_fix(toy_method, sets, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        resolve_run_config(method="toy", profile="cpu", sets=sets)


def test_unknown_profile_lists_choices(toy_method):
    with pytest.raises(ConfigError, match="choose one of: cpu, paper"):
        resolve_run_config(method="toy", profile="fast")


def test_flag_not_applicable_to_method_is_an_error(toy_method):
    with pytest.raises(ConfigError, match="--backbone-weights does not apply to method toy"):
        resolve_run_config(method="toy", profile="cpu", method_flags={"backbone_weights": "x.pth"})


def test_method_mismatch_and_bad_yaml(toy_method, tmp_path):
    other = tmp_path / "o.yaml"
    other.write_text("method: draem\n")
    with pytest.raises(ConfigError, match="for method 'draem' but --method is 'toy'"):
        resolve_run_config(method="toy", profile="cpu", config_file=other)
    broken = tmp_path / "b.yaml"
    broken.write_text("common: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_run_config(method="toy", profile="cpu", config_file=broken)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_run_config(method="toy", profile="cpu", config_file=tmp_path / "missing.yaml")


def test_parse_set_option():
    assert parse_set_option("a.b.c=1.5") == {"a": {"b": {"c": 1.5}}}
    assert parse_set_option("common.device=cpu") == {"common": {"device": "cpu"}}
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_set_option("nonsense")


def test_round_trip_of_effective_config(toy_method):
    from toy_detector import ToyConfig

    from surfaceinspect.config import run_config_from_dict

    run = resolve_run_config(method="toy", profile="cpu", common_flags={"seed": 3})
    again = run_config_from_dict(ToyConfig, run.to_dict())
    assert again.to_dict() == run.to_dict()
    assert "seed: 3" in run.to_yaml()


def test_shipped_profiles_exist_for_every_method_and_validate():
    from surfaceinspect.detectors import available_methods

    profiles = list_profiles()
    for method in available_methods():
        for name in ("cpu", "paper"):
            assert f"{method}-{name}" in profiles, f"sample_configs/{method}-{name}.yaml is missing"
            run = resolve_run_config(method=method, profile=name, common_flags={"device": "cpu"})
            assert run.method == method and run.profile == name


def test_inference_overrides_only_touch_inference_settings() -> None:
    from surfaceinspect.config import build_run_config, with_inference_overrides
    from surfaceinspect.detectors.draem.config import DraemConfig
    from surfaceinspect.errors import ConfigError

    run = build_run_config(DraemConfig, "cpu", [])
    before = run.method_config.smoothing_kernel
    changed = with_inference_overrides(run, ["draem.smoothing_kernel=11"])
    assert before != 11 and changed.method_config.smoothing_kernel == 11
    assert run.method_config.smoothing_kernel == before
    assert changed.method_config.recon_width == run.method_config.recon_width
    for bad in ("draem.recon_width=64", "common.image_size=64", "csflow.map_sigma=1"):
        with pytest.raises(ConfigError, match="inference settings"):
            with_inference_overrides(run, [bad])
    with pytest.raises(ConfigError, match="smoothing_kernel"):
        with_inference_overrides(run, ["draem.smoothing_kernel=4"])  # validated: must be odd


@pytest.mark.parametrize(
    ("value", "hw"),
    [(256, (256, 256)), ([128, 512], (128, 512))],
)
def test_image_size_square_or_height_width(value, hw) -> None:
    from surfaceinspect.config import build_run_config
    from surfaceinspect.detectors.draem.config import DraemConfig

    run = build_run_config(DraemConfig, "cpu", [{"common": {"image_size": value}}])
    assert run.common.input_hw() == hw


def test_keep_aspect_resolves_to_method_multiples() -> None:
    from surfaceinspect.config import CommonConfig, resolve_keep_aspect

    common = CommonConfig(image_size="keep:512")
    common.validate()
    with pytest.raises(ConfigError, match="resolved from the training images"):
        common.input_hw()
    resolve_keep_aspect(common, aspect=4.1, multiple=32)  # a wide strip: 512 x 124.9 -> 128
    assert common.input_hw() == (128, 512)
    tall = CommonConfig(image_size="keep:500")
    resolve_keep_aspect(tall, aspect=0.5, multiple=128)
    assert tall.input_hw() == (512, 256)


@pytest.mark.parametrize(
    ("value", "message"),
    [("keep:abc", "keep:L"), ("big", "keep:L"), ([64], "two sides"), ([16, 64], "at least 32")],
)
def test_bad_image_sizes_say_what_works(value, message) -> None:
    from surfaceinspect.config import CommonConfig

    with pytest.raises(ConfigError, match=message):
        CommonConfig(image_size=value).validate()


def test_non_square_size_must_suit_the_method() -> None:
    from surfaceinspect.config import CommonConfig
    from surfaceinspect.detectors.csflow.config import CSFlowConfig

    with pytest.raises(ConfigError, match=r"multiple of 128; use \[256, 512\]"):
        CSFlowConfig().validate(CommonConfig(image_size=[250, 500]))
    CSFlowConfig().validate(CommonConfig(image_size=[256, 1024]))


def test_exponent_without_a_dot_is_a_number(toy_method, tmp_path):
    # PyYAML reads 1e-3 as text (YAML 1.1 wants 1.0e-3); people write it the short way.
    run = resolve_run_config(method="toy", profile="cpu", sets=["toy.lr=1e-3"])
    assert run.method_config.lr == pytest.approx(1e-3)
    config = tmp_path / "c.yaml"
    config.write_text("method: toy\ntoy:\n  lr: 5E-4\n", encoding="utf-8")
    assert resolve_run_config(method="toy", config_file=config).method_config.lr == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match=r"toy\.lr: expected a finite number"):
        resolve_run_config(method="toy", profile="cpu", sets=["toy.lr=nan"])
    with pytest.raises(ConfigError, match=r"toy\.lr: expected a number"):
        resolve_run_config(method="toy", profile="cpu", sets=["toy.lr=fast"])
