"""The torch-free scoring install (surfaceinspect-runtime) against the full install: size, cold start, memory, speed.

For each install, with the same model and images, one process at a time:

- install size: its site-packages on disk (du-style: allocated blocks, hard links once) and the
  largest top-level entries in it (torch, nvidia, onnxruntime, cv2, ...);
- cold start to the first verdict: the wall time of a fresh ``python -m surfaceinspect score ONE_IMAGE
  --model RUN --json`` process, median of ``--runs`` runs, interleaved between the installs. One
  untimed run per install first, so the page cache is WARM (the files of the install and the model
  are in memory): this is the start of a process on a PC that has scored before, not the first one
  after a reboot;
- the peak RSS of that process (``ru_maxrss`` from ``wait4``: the largest of the process and the
  children it waited for, not their sum);
- images/s scoring the folder of K images: ``score DIR --model RUN --json`` with score's default
  --workers (unless ``--workers``), median of ``--folder-runs`` runs; K / the whole process's wall
  time (start included), and K / (that time - the median cold start) as an estimate without the start.

Prints one JSON line per install, then a markdown table. A measurement that fails gives a JSON line
with ``error`` and a row saying so; the script then exits 1. Standard library only: any python runs
it. Run it on an idle machine.

    python benchmarks/slim_install.py --model RUN --images DIR \\
        --slim-venv /tmp/slim-venv --full-python .venv/bin/python [--full-pythonpath .]

The slim venv: ``SLIM_VENV=/tmp/slim-venv scripts/slim_check.sh`` makes one (and keeps it).
``--full-pythonpath DIR`` puts a checkout first on the full install's path (to measure a worktree's
code with another checkout's venv); the slim venv always runs its installed wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass
class Install:
    name: str
    python: Path
    env: dict[str, str]
    result: dict = field(default_factory=dict)
    cold: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return "error" in self.result


def disk_usage(root: Path) -> int:
    """Bytes allocated under root, as ``du -s`` counts them: every inode once, symlinks not followed."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total + os.lstat(root).st_blocks * 512


def sizes(python: Path, env: dict[str, str], top: int) -> dict:
    code = (
        "import json, sys, sysconfig; p = sysconfig.get_paths(); "
        "print(json.dumps({'site': sorted({p['purelib'], p['platlib']}), 'python': sys.version.split()[0]}))"
    )
    info = json.loads(subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    entries: dict[str, int] = {}
    total = 0
    for site in map(Path, info["site"]):
        total += disk_usage(site)
        for entry in site.iterdir():
            if entry.name == "__pycache__":
                continue
            size = disk_usage(entry) if entry.is_dir() and not entry.is_symlink() else entry.lstat().st_blocks * 512
            entries[entry.name] = entries.get(entry.name, 0) + size
    largest = sorted(entries.items(), key=lambda kv: -kv[1])[:top]
    return {
        "python_version": info["python"],
        "site_packages": info["site"],
        "site_packages_mb": round(total / 2**20, 1),
        "largest_mb": {name: round(size / 2**20, 1) for name, size in largest},
    }


def versions(python: Path, env: dict[str, str]) -> dict:
    code = (
        "import json\nfrom importlib import metadata as m\nout = {}\n"
        "for d in ('surfaceinspect', 'surfaceinspect-runtime', 'onnxruntime', 'torch', 'numpy'):\n"
        "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))"
    )
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def run_score(install: Install, args: list[str], cwd: Path) -> tuple[float, int, list[dict], str]:
    """Run ``python -m surfaceinspect score ARGS --json`` once: wall seconds, peak RSS in bytes, records, stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        cmd = [str(install.python), "-m", "surfaceinspect", "score", *args, "--json"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=install.env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode not in (0, 1):  # 1: a defect found, a verdict like any other
        last = " ".join(line for line in stderr.strip().splitlines()[-2:])
        raise RuntimeError(f"{install.name}: `{' '.join(cmd)}` exited {proc.returncode}: {last}")
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return wall, usage.ru_maxrss * 1024, records, stderr  # ru_maxrss is in KiB on Linux


def check_records(install: Install, records: list[dict], expected: int) -> None:
    if len(records) != expected:
        raise RuntimeError(f"{install.name}: {len(records)} records for {expected} images")
    install.result["runtime"] = sorted({str(r.get("runtime")) for r in records})


def fmt(value: object, suffix: str = "") -> str:
    return "–" if value is None else f"{value}{suffix}"


def table(installs: list[Install]) -> str:
    rows = [
        "| install | site-packages | largest | cold start to first verdict (median) | peak RSS | images/s (folder) "
        "| images/s without start | runtime |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for inst in installs:
        r = inst.result
        largest = ", ".join(f"{k} {v:.0f}" for k, v in list(r.get("largest_mb", {}).items())[:4])
        if inst.failed:
            rows.append(
                f"| {inst.name} | {fmt(r.get('site_packages_mb'), ' MB')} | {largest} | "
                f"not measured: {r['error']} | | | | |"
            )
            continue
        rows.append(
            f"| {inst.name} | {fmt(r.get('site_packages_mb'), ' MB')} | {largest} | {fmt(r.get('cold_start_s'), ' s')} "
            f"| {fmt(r.get('peak_rss_mb'), ' MB')} | {fmt(r.get('images_per_s'))} "
            f"| {fmt(r.get('images_per_s_without_start'))} | {', '.join(r.get('runtime', []))} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="RUN (or export) folder from the full install")
    ap.add_argument("--images", type=Path, required=True, help="folder of K images (scored as a whole for images/s)")
    ap.add_argument("--one-image", type=Path, help="the image of the cold start (default: the first in --images)")
    ap.add_argument("--slim-venv", type=Path, required=True, help="venv with surfaceinspect-runtime installed")
    ap.add_argument("--full-python", type=Path, required=True, help="python of the full install (with torch)")
    ap.add_argument("--full-pythonpath", type=Path, help="a checkout to put first on the full install's path")
    ap.add_argument("--runs", type=int, default=7, help="cold-start runs per install (after one untimed)")
    ap.add_argument("--folder-runs", type=int, default=3, help="timed runs over the folder per install")
    ap.add_argument("--workers", type=int, help="score --workers (default: score's own default)")
    ap.add_argument("--threads", type=int, help="score --threads (default: score's own default)")
    ap.add_argument("--top", type=int, default=8, help="how many of the largest site-packages entries to list")
    args = ap.parse_args()

    model, images = args.model.resolve(), args.images.resolve()
    folder = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not folder:
        ap.error(f"no images in {images}")
    one = (args.one_image or folder[0]).resolve()
    extra = [*(["--workers", str(args.workers)] if args.workers is not None else [])]
    extra += [*(["--threads", str(args.threads)] if args.threads is not None else [])]

    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env = dict(base_env)
    if args.full_pythonpath:
        full_env["PYTHONPATH"] = str(args.full_pythonpath.resolve())
    slim_python = args.slim_venv / "bin" / "python"
    full_python = args.full_python if args.full_python.is_absolute() else Path.cwd() / args.full_python
    installs = [Install("slim", slim_python.absolute(), base_env), Install("full", full_python, full_env)]

    machine = {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    for inst in installs:
        inst.result = {"install": inst.name, "python": str(inst.python), **machine}
        if not inst.python.exists():
            inst.result["error"] = f"no python at {inst.python}"
            continue
        inst.result.update(sizes(inst.python, inst.env, args.top))
        inst.result["versions"] = versions(inst.python, inst.env)

    with tempfile.TemporaryDirectory(prefix="slim-install-bench-") as tmp:
        cwd = Path(tmp)  # not a checkout: `python -m surfaceinspect` must import the install's copy

        def attempt(inst: Install, images_arg: Path, expected: int) -> tuple[float, int] | None:
            """One score process; on a failure, the install's error (reported once) and None."""
            try:
                wall, rss, records, _ = run_score(inst, [str(images_arg), "--model", str(model), *extra], cwd)
                check_records(inst, records, expected)
            except RuntimeError as exc:
                inst.result["error"] = str(exc)
                print(f"error: {exc}", file=sys.stderr)
                return None
            return wall, rss

        for inst in installs:  # untimed: warms the page cache, checks that the install scores at all
            if not inst.failed:
                attempt(inst, one, 1)
        for _ in range(args.runs):  # interleaved, one process at a time
            for inst in installs:
                if not inst.failed and (done := attempt(inst, one, 1)):
                    inst.cold.append(done[0])
                    inst.rss.append(done[1])
        for inst in installs:
            walls = []
            for _ in range(args.folder_runs):
                if not inst.failed and (done := attempt(inst, images, len(folder))):
                    walls.append(done[0])
            if inst.failed:
                continue
            cold = statistics.median(inst.cold)
            folder_s = statistics.median(walls)
            inst.result.update(
                {
                    "cold_start_s": round(cold, 3),
                    "cold_start_runs_s": [round(w, 3) for w in inst.cold],
                    "page_cache": "warm (one untimed run first)",
                    "peak_rss_mb": round(max(inst.rss) / 2**20, 1),
                    "images": len(folder),
                    "folder_wall_s": round(folder_s, 3),
                    "folder_runs_s": [round(w, 3) for w in walls],
                    "images_per_s": round(len(folder) / folder_s, 2),
                    "images_per_s_without_start": (
                        round(len(folder) / (folder_s - cold), 2) if folder_s > cold else None
                    ),
                    "workers": args.workers,
                    "threads": args.threads,
                }
            )

    for inst in installs:
        print(json.dumps(inst.result))
    print()
    print(table(installs))
    return 1 if any(inst.failed for inst in installs) else 0


if __name__ == "__main__":
    sys.exit(main())
