#!/usr/bin/env bash
# make slim-check: the torch-free scoring install (surfaceinspect-runtime, issue #31) end to end.
#
#   1. builds the runtime's sdist and wheel (packaging/runtime/build_runtime.py: it also checks the
#      wheel's files and that its Requires-Dist names no training-only package);
#   2. creates a fresh venv (python3 -m venv, with pip) and pip-installs the runtime wheel into it,
#      its dependencies really downloaded from the index, at the versions of constraints.txt;
#   3. checks that torch (and every other training-only package) is NOT in that venv, then runs
#      `surfaceinspect --version` and `surfaceinspect profiles` from it;
#   4. trains a tiny DRAEM model (with its ONNX export) with the FULL install ($PYTHON, running this
#      checkout's code), then scores it from the slim venv: `score --json` on the run folder and on a
#      copy of its export folder alone, and `heatmap`; every record must say runtime "onnx";
#   5. checks that what needs torch (train, export, score --runtime torch) is refused in the slim venv
#      with a short error, not a traceback or an internal error (exit 4).
#
# Every check of steps 3-5 runs even when an earlier one failed; the summary lists them, and the
# script exits 1 if any failed. A command that fails on `import torch` is reported as such, with the
# chain of surfaceinspect modules that led to the import (from a rerun with --debug).
#
# Usage: scripts/slim_check.sh      PYTHON: the full install (default .venv/bin/python): builds, trains.
#   VENV_PYTHON: the interpreter the slim venv is made from (default python3).
#   SLIM_VENV=DIR: create the slim venv there (must not exist) and keep it (for benchmarks/slim_install.py).
#   KEEP=1: keep the work folder (data, run, records, logs).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
abspath() { if [[ $1 == */* ]]; then echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; else command -v "$1"; fi; }
PYTHON=$(abspath "${PYTHON:-.venv/bin/python}")
VENV_PYTHON=$(abspath "${VENV_PYTHON:-python3}")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/surfaceinspect-slim-check.XXXXXX")
if [[ "${KEEP:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
if [[ -n "${SLIM_VENV:-}" ]]; then
    [[ -e $SLIM_VENV ]] && { echo "SLIM_VENV=$SLIM_VENV exists: remove it or choose another path"; exit 2; }
    mkdir -p "$(dirname "$SLIM_VENV")"
    SLIM=$(cd "$(dirname "$SLIM_VENV")" && pwd)/$(basename "$SLIM_VENV")
else
    SLIM=$WORK/slim-venv
fi
unset PYTHONPATH  # nothing of the checkout may leak into the slim venv
step() { printf '\n== %s\n' "$*"; }
FAILED=()
PASSED=()
fail() { FAILED+=("$1"); printf 'FAIL %s: %s\n' "$1" "$2"; }
pass() { PASSED+=("$1"); printf 'ok   %s%s\n' "$1" "${2:+: $2}"; }

step "build surfaceinspect-runtime (sdist, and the wheel from it) into $WORK/dist"
"$PYTHON" packaging/runtime/build_runtime.py --outdir "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/surfaceinspect_runtime-*.whl)
VERSION=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$REPO/pyproject.toml")
TRAINING_ONLY=$("$PYTHON" -c 'import sys; sys.path.insert(0, "packaging/runtime"); import build_runtime as b
print(" ".join(sorted(b.TRAINING_ONLY)))')

step "fresh venv $SLIM ($VENV_PYTHON -m venv), pip install the runtime wheel (-c constraints.txt)"
"$VENV_PYTHON" -m venv "$SLIM"
start=$(date +%s)
"$SLIM/bin/python" -m pip install --disable-pip-version-check -c "$REPO/constraints.txt" "$WHEEL" \
    >"$WORK/pip-install.log" 2>&1 || { tail -n 30 "$WORK/pip-install.log"; echo "pip install failed"; exit 1; }
echo "installed in $(( $(date +%s) - start )) s: $(grep '^Successfully installed' "$WORK/pip-install.log" | cut -c1-400)"
"$SLIM/bin/python" -m pip check --disable-pip-version-check
SITE=$("$SLIM/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "site-packages: $(du -sh "$SITE" | cut -f1)"
SI=$SLIM/bin/surfaceinspect
cd "$WORK"  # not the checkout: `python -m` would find the package in the current folder

step "no torch in the slim venv"
if "$SLIM/bin/python" -c "import torch" 2>"$WORK/import-torch.err"; then
    fail "no-torch" "import torch SUCCEEDS in the slim venv"
elif grep -q "ModuleNotFoundError: No module named 'torch'" "$WORK/import-torch.err"; then
    pass "no-torch" "python -c 'import torch' fails: ModuleNotFoundError"
else
    fail "no-torch" "import torch fails, but not as a missing module: $(tail -n 1 "$WORK/import-torch.err")"
fi
# shellcheck disable=SC2086  # the names are one word each
if present=$("$SLIM/bin/python" - $TRAINING_ONLY <<'PY'
import sys
from importlib import metadata

found = []
for name in sys.argv[1:]:
    try:
        found.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
print(" ".join(found))
sys.exit(1 if found else 0)
PY
); then
    pass "no-training-packages" "none of: $TRAINING_ONLY"
else
    fail "no-training-packages" "installed in the slim venv: $present"
fi
where=$("$SLIM/bin/python" -c 'import importlib.util; print(importlib.util.find_spec("surfaceinspect").origin)')
if [[ $where == "$SLIM"/* ]]; then pass "imports-installed-copy" "$where"; else fail "imports-installed-copy" "$where"; fi

# slim NAME "OK EXIT CODES" ARGS...: run the slim venv's surfaceinspect; stdout -> NAME.out, stderr -> NAME.err.
# On another exit code, says why (torch import or not) and shows the import chain from a rerun with --debug.
slim() {
    local name=$1 ok=$2 rc=0
    shift 2
    "$SI" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || rc=$?
    [[ " $ok " == *" $rc "* ]] && return 0
    local last
    last=$(grep -v '^\s*$' "$WORK/$name.err" | tail -n 2 | tr '\n' ' ')
    if grep -q "No module named 'torch'" "$WORK/$name.err"; then
        fail "$name" "exit $rc: the code path still imports torch: $last"
    else
        fail "$name" "exit $rc: $last"
    fi
    echo "     surfaceinspect frames of a rerun with --debug (innermost last):"
    _TYPER_STANDARD_TRACEBACK=1 COLUMNS=200 "$SI" --debug "$@" 2>&1 >/dev/null \
        | grep -E '^  File ".*/surfaceinspect/' | sed -E 's|^  File ".*/(surfaceinspect/[^"]*)", line ([0-9]+), in (.*)|       \1:\2 (\3)|' \
        | tail -n 8 || true
    return 1
}
# records NAME FILE: every line a record scored with ONNX Runtime, one per test image.
records() {
    local out
    if out=$("$SLIM/bin/python" - "$2" "$N_TEST" <<'PY'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
runtimes = sorted({str(r.get("runtime")) for r in rows})
verdicts = sorted({str(r.get("verdict")) for r in rows})
print(f"{len(rows)} records, runtime {runtimes}, verdicts {verdicts}")
sys.exit(0 if len(rows) == int(sys.argv[2]) and runtimes == ["onnx"] else 1)
PY
    ); then pass "$1" "$out"; else fail "$1" "expected $N_TEST records, all runtime onnx: $out"; fi
}

step "surfaceinspect --version, profiles (slim venv)"
if slim version "0" --version; then
    if grep -q "$VERSION" "$WORK/version.out"; then pass version "$(cat "$WORK/version.out")"
    else fail version "says '$(cat "$WORK/version.out")', pyproject.toml says $VERSION"; fi
fi
if COLUMNS=200 slim profiles "0" profiles; then
    missing=()
    for yaml in "$REPO"/sample_configs/*.yaml; do
        grep -q "$(basename "$yaml")" "$WORK/profiles.out" || missing+=("$(basename "$yaml")")
    done
    if [[ ${#missing[@]} == 0 ]]; then pass profiles "every profile of sample_configs/ listed"
    else fail profiles "not listed: ${missing[*]}"; fi
fi

step "tiny model trained with the FULL install ($PYTHON, this checkout's code), with its ONNX export"
full() { PYTHONPATH=$REPO "$PYTHON" "$@"; }
full -c 'import surfaceinspect; print("full install runs", surfaceinspect.__file__)'
full -c 'from pathlib import Path; from surfaceinspect.data.synthetic import make_dataset
make_dataset(Path("data"), n_train=24, n_test_good=4, n_test_defect_per_type=2, size=64, seed=0)'
N_TEST=$(find data/test -type f | wc -l)
start=$(date +%s)
full -m surfaceinspect train -m draem data/train/good --out run --threads 2 --workers 0 --image-size 64 \
    --set draem.steps=4 --set draem.recon_width=8 --set draem.disc_width=4 --set draem.recon_levels=3 \
    --set draem.disc_levels=3 --set common.time_budget_min=0 --set common.calibration.min_images=4 \
    >"$WORK/train.log" 2>&1 || { tail -n 20 "$WORK/train.log"; echo "training with the full install failed"; exit 1; }
echo "train + export: $(( $(date +%s) - start )) s"
test -f run/export-onnx/model.onnx || { echo "no run/export-onnx/model.onnx: the export was refused"; exit 1; }
cp -r run/export-onnx linepc-model  # what a line PC gets when only the export folder is copied

step "score and heatmap with the slim venv ($N_TEST test images)"
# exit 1 = a defect found: the synthetic test set has defects
if slim score "0 1" score data/test --model run --json; then records score "$WORK/score.out"; fi
if slim score-export-folder "0 1" score data/test --model linepc-model --json; then
    records score-export-folder "$WORK/score-export-folder.out"
fi
if slim heatmap "0 1" heatmap data/test --model run --out heatmaps --output heatmap-records.jsonl; then
    pngs=$(find heatmaps -name '*.png' | wc -l)
    if [[ -f heatmaps/index.html && $pngs -ge $N_TEST ]]; then pass heatmap-files "index.html and $pngs PNGs"
    else fail heatmap-files "heatmaps/: index.html $( [[ -f heatmaps/index.html ]] && echo present || echo missing), $pngs PNGs"
    fi
    records heatmap-records "$WORK/heatmap-records.jsonl"
fi

step "what needs torch is refused in the slim venv: a short error naming the full install, no traceback"
refused() {  # NAME ARGS...
    local name=$1 rc=0
    shift
    "$SI" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || rc=$?
    local lines msg
    lines=$(grep -cv '^\s*$' "$WORK/$name.err" || true)
    msg=$(grep -v '^\s*$' "$WORK/$name.err" | head -n 3 | tr '\n' ' ')
    if [[ $rc == 0 ]]; then
        fail "$name" "exit 0: not refused"
    elif [[ $rc == 4 ]] || grep -qE 'Traceback|internal error' "$WORK/$name.err"; then
        fail "$name" "exit $rc: an internal error, not a refusal: $msg"
    elif (( lines > 3 )); then
        fail "$name" "exit $rc, refused with $lines lines of stderr (expected a short error): $msg"
    elif ! grep -qiE "pip install [\"']?surfaceinspect([^-_a-z]|$)" "$WORK/$name.err"; then
        fail "$name" "exit $rc, the error does not name the full install ('pip install surfaceinspect'): $msg"
    else
        pass "$name" "exit $rc: $msg"
    fi
}
# tiny settings: were it not refused (torch found after all), it would not train for minutes
refused refuses-train train -m draem data/train/good --out run-slim --image-size 64 --workers 0 \
    --set draem.steps=4 --set common.time_budget_min=0 --set common.calibration.min_images=4
refused refuses-export export --model run --out export-slim
refused refuses-runtime-torch score data/test --model run --runtime torch --json

step "summary"
printf 'ok   %s\n' "${PASSED[@]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    printf 'FAIL %s\n' "${FAILED[@]}"
    echo "slim-check FAILED: ${#FAILED[@]} of $(( ${#FAILED[@]} + ${#PASSED[@]} )) checks ($( [[ ${KEEP:-0} == 1 ]] \
        && echo "logs in $WORK" || echo "KEEP=1 keeps the logs"))"
    exit 1
fi
echo "slim-check passed: ${#PASSED[@]} checks; slim venv $SLIM"

