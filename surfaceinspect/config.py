"""Typed configuration: common settings plus one section per method.

Precedence, lowest first: dataclass defaults < named profile (``sample_configs/<method>-<profile>.yaml``)
< ``--config FILE.yaml`` < command-line flags (``--image-size`` …, ``--set section.key=value``).
Everything is validated before any work starts; errors name the key and say how to fix it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from surfaceinspect.errors import ConfigError

PROFILE_DIRS = (
    Path(__file__).resolve().parent / "sample_configs",  # installed wheel
    Path(__file__).resolve().parent.parent / "sample_configs",  # source checkout / editable install
)
# More folders of profiles, searched first (os.pathsep-separated): a plug-in method's profiles.
PROFILES_ENV = "SURFACEINSPECT_PROFILES"


@dataclass
class CalibrationConfig:
    """How the decision thresholds are set from held-out good images."""

    fraction: float = 0.1  # share of the good images kept out of training for calibration
    min_images: int = 10  # never fewer calibration images than this
    false_reject_rate: float = 0.01  # target share of good images flagged as defective
    mode: str = "quantile"  # quantile (good images only) | f1 | recall (labelled folder needed)
    target_recall: float = 0.95  # with mode=recall
    # quantile mode: auto (conformal from 99 good images on, a log-normal tail from 20 to 98; measured on
    # all three development sets, docs/calibration.md) | conformal (the order statistic: guaranteed, but the
    # highest good score below 1/rate - 1 images) | lognormal | normal (a fitted tail: one odd image moves
    # it little; calibration.threshold_for)
    estimator: str = "auto"

    def validate(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"common.calibration.fraction={self.fraction}: use a value between 0 and 1, e.g. 0.1")
        if self.min_images < 1:
            raise ConfigError(f"common.calibration.min_images={self.min_images}: use at least 1")
        if not 0.0 < self.false_reject_rate < 0.5:
            raise ConfigError(
                f"common.calibration.false_reject_rate={self.false_reject_rate}: use a value in (0, 0.5), e.g. 0.01"
            )
        if self.mode not in ("quantile", "f1", "recall"):
            raise ConfigError(f"common.calibration.mode={self.mode!r}: use quantile, f1 or recall")
        if self.estimator not in ("auto", "conformal", "lognormal", "normal"):
            raise ConfigError(
                f"common.calibration.estimator={self.estimator!r}: use auto, conformal, lognormal or normal"
            )
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(f"common.calibration.target_recall={self.target_recall}: use a value in (0, 1]")


@dataclass
class TilingConfig:
    """Score large images tile by tile at their own resolution instead of shrinking them whole.

    Each tile is ``common.image_size`` pixels (of the image after ``scale``), the network's input;
    the model is trained on tiles of the training images. Maps of overlapping tiles are blended
    with a smooth window, so the stitched map has no seams; the image score is the highest tile score.
    """

    enabled: bool = False
    overlap: float = 0.25  # share of a tile's side that it shares with each neighbour
    scale: float = 1.0  # resize every image by this factor before tiling (0.5 = half resolution)
    max_train_tiles: int = 4000  # tiles sampled from the training images (bounds training memory)

    def validate(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"common.tiling.overlap={self.overlap}: use a share in [0, 1), e.g. 0.25")
        if not 0.0 < self.scale <= 1.0:
            raise ConfigError(f"common.tiling.scale={self.scale}: use a factor in (0, 1], e.g. 0.5 for half size")
        if self.max_train_tiles < 2:
            raise ConfigError(f"common.tiling.max_train_tiles={self.max_train_tiles}: use at least 2 (e.g. 4000)")


KEEP_ASPECT_PREFIX = "keep:"
MIN_SIDE = 32


@dataclass
class CommonConfig:
    """Settings every method shares."""

    # Network input: S (S x S), [H, W], or "keep:L" (long side L, the other side from the median
    # aspect of the training images; resolved once at training and stored as [H, W] with the model).
    # Sides are rounded to the method's size multiple. With tiling: the size of one tile.
    image_size: int | list[int] | str = 256
    batch_size: int = 8
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    workers: int = 2  # image-reading threads (0 = the main thread); DRAEM's anomaly synthesis: worker processes
    threads: int = 0  # torch CPU threads; 0 = one per available core
    bad_images: str = "skip"  # unreadable training images: skip (report and go on) | stop
    checkpoint_every_s: float = 120.0  # seconds between resumable training checkpoints
    time_budget_min: float = 0.0  # >0: fit the training schedule into this many minutes
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)

    @property
    def keeps_aspect(self) -> bool:
        """True while image_size is still the unresolved ``keep:L`` form."""
        return isinstance(self.image_size, str)

    def input_hw(self) -> tuple[int, int]:
        """The network input ``(H, W)``; ``keep:L`` must have been resolved (see :func:`resolve_keep_aspect`)."""
        size = self.image_size
        if isinstance(size, str):
            raise ConfigError(
                f"common.image_size={size!r} is resolved from the training images; it has no size before training"
            )
        if isinstance(size, int):
            return size, size
        return int(size[0]), int(size[1])

    def validate(self) -> None:
        self._validate_image_size()
        if self.batch_size < 1:
            raise ConfigError(f"common.batch_size={self.batch_size}: use at least 1")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"common.device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.workers < 0 or self.threads < 0:
            raise ConfigError("common.workers and common.threads must be >= 0")
        if self.bad_images not in ("skip", "stop"):
            raise ConfigError(f"common.bad_images={self.bad_images!r}: use skip or stop")
        if self.checkpoint_every_s <= 0:
            raise ConfigError("common.checkpoint_every_s must be > 0")
        if self.time_budget_min < 0:
            raise ConfigError("common.time_budget_min must be >= 0 (0 = no budget)")
        self.calibration.validate()
        self.tiling.validate()

    def _validate_image_size(self) -> None:
        size = self.image_size
        hint = "use S (square), [H, W] or keep:L (long side L, aspect of the training images), e.g. 256"
        if isinstance(size, str):
            long_side = size.removeprefix(KEEP_ASPECT_PREFIX)
            if not size.startswith(KEEP_ASPECT_PREFIX) or not long_side.isdigit():
                raise ConfigError(f"common.image_size={size!r}: {hint}")
            sides = [int(long_side)]
        elif isinstance(size, list):
            if len(size) != 2:
                raise ConfigError(f"common.image_size={size}: give two sides [H, W]; {hint}")
            sides = list(size)
        else:
            sides = [size]
        if min(sides) < MIN_SIDE:
            raise ConfigError(f"common.image_size={size}: use at least {MIN_SIDE} pixels per side (e.g. 256)")


def parse_image_size(text: str) -> int | list[int] | str:
    """``--image-size`` text: ``S``, ``HxW`` or ``[H, W]``, or ``keep:L``, as ``common.image_size`` holds it."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    parts = text.strip("[]()").replace("x", ",").replace("X", ",").split(",")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        return [int(p) for p in parts]
    return text  # keep:L, or a mistake that validation names


def resolve_keep_aspect(common: CommonConfig, aspect: float, multiple: int) -> None:
    """Replace ``keep:L`` by ``[H, W]``: long side L, the other from ``aspect`` (width / height).

    Both sides are rounded to the nearest multiple of ``multiple`` (never below it).
    """
    if not isinstance(common.image_size, str):
        return
    long_side = int(common.image_size.removeprefix(KEEP_ASPECT_PREFIX))
    short = long_side / aspect if aspect >= 1.0 else long_side * aspect
    long_r, short_r = (max(multiple, round(v / multiple) * multiple) for v in (long_side, short))
    common.image_size = [short_r, long_r] if aspect >= 1.0 else [long_r, short_r]


def nearby_sizes(side: int, multiple: int) -> list[int]:
    """The two valid sizes closest to ``side`` (multiples of ``multiple``)."""
    lower = side // multiple * multiple
    return [s for s in (lower, lower + multiple, lower + 2 * multiple) if s >= multiple][:2]


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters. Subclasses add fields and override ``validate``."""

    method: ClassVar[str] = ""
    # Settings that change how a trained model scores but not its weights (e.g. map smoothing).
    # Only these may be overridden on a trained model (``benchmark --model RUN --set ...``).
    inference_keys: ClassVar[frozenset[str]] = frozenset()
    # Method-specific command-line options of ``train``: field name -> help text. ``--field-name
    # VALUE`` sets the field; every other field is set with ``--set <method>.<field>=VALUE``.
    cli_options: ClassVar[dict[str, str]] = {}
    # What each of the method's shipped profiles is for (profile name -> one line), shown by
    # ``surfaceinspect profiles``; a profile without a line shows its YAML file's first comment line.
    profile_notes: ClassVar[dict[str, str]] = {}
    epochs: int = 1
    lr: float = 1e-4

    def size_multiple(self) -> int:
        """Every side of the network input must be a multiple of this (e.g. one halving per level)."""
        return 1

    def size_reason(self) -> str:
        """Why :meth:`size_multiple` is what it is, for error messages (e.g. "DRAEM halves the image 5 times")."""
        return f"{self.method} needs it"

    def validate(self, common: CommonConfig) -> None:
        """Raise ConfigError if this configuration cannot work with ``common`` (e.g. image size)."""
        if self.epochs < 1:
            raise ConfigError(f"{self.method}.epochs={self.epochs}: use at least 1")
        if self.lr <= 0:
            raise ConfigError(f"{self.method}.lr={self.lr}: must be > 0")
        self.validate_input_size(common)

    def validate_input_size(self, common: CommonConfig) -> None:
        """Each side of ``common.image_size`` must be a multiple of :meth:`size_multiple`; say which sizes work."""
        m = self.size_multiple()
        if common.keeps_aspect:
            return  # resolve_keep_aspect rounds to the multiple
        h, w = common.input_hw()
        if h % m == 0 and w % m == 0:
            return
        if isinstance(common.image_size, int):
            fix = " or ".join(str(s) for s in nearby_sizes(h, m))
        else:
            fix = str([max(m, round(side / m) * m) for side in (h, w)])
        raise ConfigError(
            f"common.image_size={common.image_size}: {self.size_reason()}, so each side must be a multiple of {m}; "
            f"use {fix}"
        )

    def check_resources(self) -> None:
        """Raise now if a file this method needs for training is missing (e.g. pretrained weights).

        Called by ``train`` before any image is read, so a missing file fails in seconds, not after
        the data has been loaded. Not part of ``validate``: a trained model needs no such file.
        """


@dataclass
class RunConfig:
    """The effective configuration of one model: method, profile, common and method sections."""

    method: str
    profile: str
    common: CommonConfig
    method_config: MethodConfig

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "profile": self.profile,
            "common": dataclasses.asdict(self.common),
            self.method: dataclasses.asdict(self.method_config),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        self.common.validate()
        self.method_config.validate(self.common)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return dataclass_from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 (no dot) as text; users write it that way in --set and files.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # nan passes every range check (all comparisons are False)
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported setting type {_type_name(tp)}")


def dataclass_from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown setting {where}{unknown[0]}; valid keys{(' of ' + prefix) if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``update`` (neither is modified)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_set_option(item: str) -> dict[str, Any]:
    """Turn ``--set a.b.c=value`` into ``{"a": {"b": {"c": value}}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: write it as section.key=value, e.g. --set draem.epochs=20")
    dotted, raw = item.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item!r}: missing key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        out = {key: out}
    return out


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with a one-line error for missing or broken files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config file {path} is not valid YAML ({first}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings (key: value), not {type(data).__name__}")
    return data


def list_profiles() -> dict[str, Path]:
    """Named profiles shipped with the tool: ``{"draem-cpu": path, ...}``."""
    found: dict[str, Path] = {}
    extra = [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    for directory in (*extra, *PROFILE_DIRS):
        if directory.is_dir():
            for path in sorted(directory.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def profile_path(method: str, profile: str) -> Path:
    """Path of the profile ``<method>-<profile>.yaml``, or a ConfigError listing the choices."""
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    profiles = list_profiles()
    key = f"{method}-{profile}"
    if key not in profiles:
        mine = sorted(name.split("-", 1)[1] for name in profiles if name.startswith(method + "-"))
        raise ConfigError(
            f"no profile {profile!r} for method {method}; choose one of: {', '.join(mine) or '(none installed)'}"
        )
    return profiles[key]


def default_profile(device: str) -> str:
    """``paper`` where CUDA will be used, ``cpu`` otherwise."""
    import torch

    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "paper" if wants_cuda else "cpu"


def build_run_config(
    method_config_cls: type[MethodConfig],
    profile: str | None,
    layers: list[dict[str, Any]],
) -> RunConfig:
    """Merge a profile and ``layers`` (config file, then flags) into a validated RunConfig.

    ``layers`` are dicts in the YAML layout: ``{"common": {...}, "<method>": {...}}``.
    """
    method = method_config_cls.method
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    if profile is None:
        profile = merged.get("profile") or default_profile(str(merged.get("common", {}).get("device", "auto")))
    base = load_yaml_file(profile_path(method, str(profile)))
    merged = deep_merge(base, merged)
    merged_method = merged.pop("method", method)
    if merged_method != method:
        raise ConfigError(f"the config is for method {merged_method!r} but --method is {method!r}; pick one")
    merged.pop("profile", None)
    unknown = sorted(set(merged) - {"common", method})
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r}; valid sections: common, {method}")
    common = dataclass_from_dict(CommonConfig, merged.get("common") or {}, prefix="common")
    method_cfg = dataclass_from_dict(method_config_cls, merged.get(method) or {}, prefix=method)
    run = RunConfig(method=method, profile=str(Path(profile).stem), common=common, method_config=method_cfg)
    run.validate()
    return run


def run_config_from_dict(method_config_cls: type[MethodConfig], data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig stored with a model (``RunConfig.to_dict`` output)."""
    method = method_config_cls.method
    common = dataclass_from_dict(CommonConfig, data.get("common") or {}, prefix="common")
    method_cfg = dataclass_from_dict(method_config_cls, data.get(method) or {}, prefix=method)
    return RunConfig(method=method, profile=str(data.get("profile", "")), common=common, method_config=method_cfg)


def with_inference_overrides(run_config: RunConfig, sets: Sequence[str]) -> RunConfig:
    """A trained model's config with inference settings replaced by ``--set section.key=value`` items.

    Only the method's ``inference_keys`` may change (anything else would not match the weights);
    the result is validated like any configuration.
    """
    if not sets:
        return run_config
    overrides: dict[str, Any] = {}
    for item in sets:
        overrides = deep_merge(overrides, parse_set_option(item))
    method_cls = type(run_config.method_config)
    changes = overrides.pop(run_config.method, {})
    if not isinstance(changes, dict):
        changes, wrong = {}, [run_config.method]
    else:
        wrong = [f"{run_config.method}.{key}" for key in changes if key not in method_cls.inference_keys]
    wrong += [str(section) for section in overrides]  # common.* or another method's section
    if wrong:
        allowed = ", ".join(f"{run_config.method}.{k}" for k in sorted(method_cls.inference_keys)) or "none"
        raise ConfigError(
            f"--set {wrong[0]}: a trained model only takes its inference settings ({allowed}); "
            "retrain to change anything else"
        )
    data = {**dataclasses.asdict(run_config.method_config), **changes}
    method_cfg = dataclass_from_dict(method_cls, data, prefix=run_config.method)
    updated = RunConfig(run_config.method, run_config.profile, run_config.common, method_cfg)
    updated.validate()
    return updated
