"""Profiles and the effective run configuration of a method.

Kept apart from :mod:`surfaceinspect.config` (plain settings, no detector) because it asks the
detector registry for the method's config class: config <- detectors <- profiles, no cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surfaceinspect.config import (
    RunConfig,
    build_run_config,
    deep_merge,
    list_profiles,
    load_yaml_file,
    parse_set_option,
)
from surfaceinspect.detectors import available_methods, get_config_class
from surfaceinspect.errors import ConfigError

# The method of a run configuration when neither the caller nor a config file names one.
FALLBACK_METHOD = "draem"


def method_profiles(method: str) -> dict[str, Path]:
    """The installed profiles of ``method``: profile name -> YAML file."""
    prefix = method + "-"
    return {name[len(prefix) :]: path for name, path in list_profiles().items() if name.startswith(prefix)}


def profile_names() -> list[str]:
    """Every installed profile name (of any registered method), sorted."""
    return sorted({name for method in available_methods() for name in method_profiles(method)})


def profile_note(method: str, profile: str, path: Path) -> str:
    """What ``profile`` of ``method`` is for: the method's ``profile_notes``, else the file's first comment."""
    note = get_config_class(method).profile_notes.get(profile)
    if note:
        return note
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_run_config(
    *,
    method: str | None,
    profile: str | None = None,
    config_file: Path | None = None,
    common_flags: dict[str, Any] | None = None,
    method_flags: dict[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> RunConfig:
    """Build the effective config: profile < ``--config`` file < named flags < ``--set`` items.

    ``method`` None takes the config file's method, else :data:`FALLBACK_METHOD` (the command
    line's default is ``auto``, which trains candidates through :mod:`surfaceinspect.workflows.auto`).
    ``common_flags`` name ``common`` fields (``calibration.fraction`` for nested ones); ``method_flags`` name fields of
    the method's config (``epochs``, ``lr`` and its ``cli_options``). A flag that the chosen method
    does not have is an error, not silently ignored; None values are flags not given.
    """
    file_layer = load_yaml_file(config_file) if config_file else {}
    method = str(method or file_layer.get("method") or FALLBACK_METHOD)
    cls = get_config_class(method)
    accepted = {"epochs", "lr", *cls.cli_options}
    flag_layer: dict[str, Any] = {"common": {}, method: {}}
    for key, value in (common_flags or {}).items():
        if value is None:
            continue
        section, _, sub = key.rpartition(".")
        target = flag_layer["common"].setdefault(section, {}) if section else flag_layer["common"]
        target[sub] = value
    for key, value in (method_flags or {}).items():
        if value is None:
            continue
        if key not in accepted:
            own = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(cls.cli_options)) or "none"
            raise ConfigError(
                f"--{key.replace('_', '-')} does not apply to method {method} (its own options: {own}); "
                f"set other settings with --set {method}.KEY=VALUE"
            )
        flag_layer[method][key] = value
    for item in sets:
        flag_layer = deep_merge(flag_layer, parse_set_option(item))
    return build_run_config(cls, profile, [file_layer, flag_layer])
