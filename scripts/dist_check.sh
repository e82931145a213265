#!/usr/bin/env bash
# make dist-check: build the wheel and sdist, install the wheel into a fresh venv, and run it there.
#
# Proves the package works without the clone: the wheel carries the code and the profiles
# (sample_configs) the commands read, its console script starts, and a short train (with its ONNX
# export) and score run from the installed copy, not from this checkout.
#
# The dependencies are NOT installed into the fresh venv (torch alone is gigabytes): a .pth file in
# it points at the site-packages of $PYTHON's environment (the project's .venv), so the venv sees
# torch, onnxruntime, ... from there. A .pth line only appends that folder to sys.path; the .pth
# files inside it are not run, so the checkout's editable install stays out of sight, and the
# wheel's copy (installed into the venv itself, earlier on sys.path) is what gets imported; the
# script checks that. `pip check` then confirms the wheel's declared dependencies are satisfied.
#
# Usage: scripts/dist_check.sh [--demo]      PYTHON=.venv/bin/python by default; KEEP=1 keeps the work folder.
#   --demo: also run `surfaceinspect demo` (about 3-5 minutes: trains both methods) after
#           the short train + score.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
abspath() { if [[ $1 == */* ]]; then echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; else command -v "$1"; fi; }
# absolute: the script changes into its work folder before it runs $PYTHON again (the version check)
PYTHON=$(abspath "${PYTHON:-.venv/bin/python}")
DEMO=0
[[ "${1:-}" == "--demo" ]] && DEMO=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/surfaceinspect-dist-check.XXXXXX")
if [[ "${KEEP:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
unset PYTHONPATH  # nothing of the checkout may leak into the installed copy
step() { printf '\n== %s\n' "$*"; }

step "build wheel and sdist (python -m build) into $WORK/dist"
"$PYTHON" -m build --outdir "$WORK/dist" "$REPO" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/surfaceinspect-*.whl)
SDIST=$(ls "$WORK"/dist/surfaceinspect-*.tar.gz)
ls -l "$WHEEL" "$SDIST"

step "contents: every module and profile in the wheel; the sources in the sdist"
"$PYTHON" - "$WHEEL" "$SDIST" "$REPO" <<'PY'
import sys, tarfile, zipfile
from pathlib import Path

wheel, sdist, repo = sys.argv[1], sys.argv[2], Path(sys.argv[3])
in_wheel = set(zipfile.ZipFile(wheel).namelist())
modules = {p.relative_to(repo).as_posix() for p in (repo / "surfaceinspect").rglob("*.py")}
profiles = {f"surfaceinspect/sample_configs/{p.name}" for p in (repo / "sample_configs").glob("*.yaml")}
missing = sorted((modules | profiles) - in_wheel)
assert not missing, f"missing from the wheel: {missing}"
assert not [n for n in in_wheel if n.startswith(("tests/", "benchmarks/"))], "tests or benchmarks in the wheel"
root = Path(sdist).name.removesuffix(".tar.gz")
in_sdist = {n.removeprefix(root + "/") for n in tarfile.open(sdist).getnames()}
needed = {"pyproject.toml", "README.md", "constraints.txt", *(f"sample_configs/{Path(p).name}" for p in profiles)}
missing = sorted((needed | modules) - in_sdist)
assert not missing, f"missing from the sdist: {missing}"
print(f"wheel: {len(modules)} modules, {len(profiles)} profiles; sdist: {len(in_sdist)} entries")
PY

step "fresh venv with the wheel; dependencies from $PYTHON's environment via a .pth file"
# --without-pip: the venv's own pip and setuptools would shadow (and conflict with) those of the
# dependencies' environment; that environment's pip installs into the venv with --python
"$PYTHON" -m venv --without-pip "$WORK/venv"
VENV_SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" -c 'import sysconfig; p = sysconfig.get_paths(); print("\n".join(dict.fromkeys([p["purelib"], p["platlib"]])))' \
    >"$VENV_SITE/_dist_check_dependencies.pth"
cat "$VENV_SITE/_dist_check_dependencies.pth"
"$PYTHON" -m pip --python "$WORK/venv/bin/python" install --quiet --no-deps --no-index --ignore-installed "$WHEEL"
"$PYTHON" -m pip --python "$WORK/venv/bin/python" check  # the wheel's dependencies, as the venv sees them
cd "$WORK"  # not the checkout: `python -m` would find the package in the current folder
"$WORK/venv/bin/python" - "$WORK/venv" <<'PY'
import sys
from pathlib import Path

import surfaceinspect

where = Path(surfaceinspect.__file__).resolve()
assert where.is_relative_to(Path(sys.argv[1]).resolve()), f"imported {where}, not the installed wheel"
print(f"imports {where}")
PY
SI="$WORK/venv/bin/surfaceinspect"

step "surfaceinspect --version"
"$SI" --version | tee "$WORK/version.txt"
grep -q "$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("'"$REPO"'/pyproject.toml","rb"))["project"]["version"])')" \
    "$WORK/version.txt"

step "surfaceinspect profiles"
COLUMNS=200 "$SI" profiles | tee "$WORK/profiles.txt"
for yaml in "$REPO"/sample_configs/*.yaml; do
    name=$(basename "$yaml")
    grep -q "$name" "$WORK/profiles.txt" || { echo "profile $name not listed by the installed package"; exit 1; }
done

step "short train (ends with the ONNX export) and score, from the installed package"
"$WORK/venv/bin/python" -c 'from pathlib import Path; from surfaceinspect.data.synthetic import make_dataset
make_dataset(Path("data"), n_train=24, n_test_good=4, n_test_defect_per_type=2, size=64, seed=0)'
start=$(date +%s)
"$SI" train -m draem data/train/good --out run --threads 2 --workers 0 --image-size 64 \
    --set draem.steps=4 --set draem.recon_width=8 --set draem.disc_width=4 --set draem.recon_levels=3 \
    --set draem.disc_levels=3 --set common.time_budget_min=0 \
    --set common.calibration.min_images=4
echo "train + export: $(( $(date +%s) - start )) s"
test -f run/export-onnx/model.onnx
set +e
"$SI" score data/test --model run --json --workers 0 >records.jsonl
rc=$?
set -e
[[ $rc == 0 || $rc == 1 ]] || { echo "score exited $rc"; exit 1; }
"$WORK/venv/bin/python" - <<'PY'
import json

rows = [json.loads(line) for line in open("records.jsonl")]
assert rows and {r["runtime"] for r in rows} == {"onnx"}, rows[:1]
verdicts = sorted({r["verdict"] for r in rows})
print(f"{len(rows)} records scored by the installed package with ONNX Runtime; verdicts {verdicts}")
PY

if [[ $DEMO == 1 ]]; then
    step "surfaceinspect demo"
    "$SI" demo --out demo_output
fi
step "dist-check passed"
