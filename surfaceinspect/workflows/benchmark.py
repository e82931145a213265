"""``surfaceinspect benchmark``: accuracy, speed and memory of methods on MVTec-layout datasets.

Each dataset x method runs in two fresh child processes, so that peak memory is measured for
training and for inference separately (a process's peak RSS never goes down):

1. train: ``engine.train`` on ``train/good`` (calibration split held out, as ``train`` does);
2. evaluate: load the model directory as ``score`` would, time the network at batch 1 and batched,
   then score ``test/`` end to end and compute the metrics.

Metrics: image AUROC, AP, F1 at the calibrated threshold and the best F1; with masks, pixel AUROC
and AUPRO (FPR limit 0.3); overall and per defect type (each type against the good test images).
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import surfaceinspect
from surfaceinspect.data.datasets import MVTecDataset, TestSample, load_mvtec
from surfaceinspect.errors import ConfigError, SurfaceInspectError
from surfaceinspect.storage.atomic import write_json_atomic, write_text_atomic
from surfaceinspect.ui import Reporter
from surfaceinspect.workflows.benchmark_report import aggregate_seeds, report_markdown

QUICK_TRAIN_IMAGES = 16
QUICK_TEST_PER_CLASS = 6
TIMING_IMAGES = 24  # batch-1 latency samples (after warm-up)
QUICK_TIMING_IMAGES = 4
AUTO = "auto"  # --method auto: the detector chosen by measurement (surfaceinspect.workflows.auto)


@dataclass
class BenchmarkOptions:
    """What to benchmark and how."""

    datasets: list[Path]
    methods: list[str]
    out_dir: Path
    profile: str | None = None
    config_file: Path | None = None
    sets: list[str] = field(default_factory=list)
    model_dir: Path | None = None
    keep_models: Path | None = None  # train into <keep_models>/<dataset>-<method> instead of a temporary folder
    quick: bool = False
    device: str | None = None
    seeds: list[int] = field(default_factory=list)  # train once per seed (common.seed); [] = the config's seed


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if platform.system() == "Darwin" else peak / 1024, 1)


def _quick_subset(ds: MVTecDataset) -> tuple[list[Path], list[TestSample]]:
    rng = np.random.default_rng(0)
    train = sorted(rng.permutation(np.array(ds.train_good, dtype=object))[:QUICK_TRAIN_IMAGES].tolist())
    good = [s for s in ds.test if not s.is_anomalous][:QUICK_TEST_PER_CLASS]
    defects = [s for s in ds.test if s.is_anomalous]
    # evenly spaced over the (type-sorted) list, so every defect type is represented
    picks = np.unique(np.linspace(0, len(defects) - 1, QUICK_TEST_PER_CLASS).round().astype(int)) if defects else []
    return train, good + [defects[i] for i in picks]


# ---------------------------------------------------------------------------------------------
# child process 1: training


def _train_child(args: dict[str, Any], queue: Any) -> None:
    try:
        reporter = Reporter(quiet=args["quiet"])
        sets = list(args["sets"])
        started = time.monotonic()
        if args["method"] == AUTO:
            result, selection = _train_auto(args, reporter, sets)
        else:
            result, selection = _train_one(args, reporter, sets), None
        queue.put(
            {
                "ok": True,
                "run_dir": str(result.run_dir),
                "train_seconds": round(time.monotonic() - started, 2),
                "summary": result.summary,
                "selection": selection,
                "peak_rss_train_mb": peak_rss_mb(),
                "threads": torch.get_num_threads(),
            }
        )
    except SurfaceInspectError as exc:
        queue.put({"ok": False, "error": str(exc)})
    except Exception as exc:  # noqa: BLE001 - reported in the benchmark, not a crash of the parent
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def _train_one(args: dict[str, Any], reporter: Reporter, sets: list[str]) -> Any:
    from surfaceinspect import engine
    from surfaceinspect.profiles import resolve_run_config

    if args["quick"]:
        # The time budget is what every detector honours (DRAEM profiles count steps, not epochs).
        sets += ["common.calibration.min_images=4", f"{args['method']}.epochs=1", "common.time_budget_min=0.25"]
    run_config = resolve_run_config(
        method=args["method"],
        profile=args["profile"],
        config_file=args["config_file"],
        common_flags={"device": args["device"]},
        sets=sets,
    )
    return engine.train(
        Path(args["dataset"]),
        run_config,
        reporter=reporter,
        run_dir=Path(args["run_dir"]),
        files=[Path(p) for p in args["train_files"]],
    )


def _rounded(values: np.ndarray) -> list[float | None]:
    return [round(float(v), 6) if np.isfinite(v) else None for v in values]


def _train_auto(args: dict[str, Any], reporter: Reporter, sets: list[str]) -> tuple[Any, dict[str, Any]]:
    """``--method auto``; each candidate's probe is also scored on the real test images (rank agreement)."""
    from surfaceinspect.workflows import auto

    if args["quick"]:
        sets += [
            "common.calibration.min_images=4",
            "auto.probe_steps=2",
            "auto.synthetic_anomalies=20",
            "draem.steps=4",
            "csflow.epochs=1",
        ]
    test = [(Path(p), bool(a)) for p, _, a, _ in args["samples"]]

    def test_auroc(name: str, detector: Any) -> dict[str, Any]:
        from surfaceinspect.analysis.metrics import image_auroc

        values = np.array(auto.score_paths(detector, [p for p, _ in test], reporter, f"test {name}"))
        labels, ok = np.array([a for _, a in test]), np.isfinite(values)
        return {"test_image_auroc": round(image_auroc(labels[ok], values[ok]), 4), "test_scores": _rounded(values)}

    request = auto.AutoRequest({"device": args["device"]} if args["device"] else {}, sets)
    selected = auto.train_auto(
        Path(args["dataset"]),
        request,
        reporter=reporter,
        run_dir=Path(args["run_dir"]),
        files=[Path(p) for p in args["train_files"]],
        on_candidate=test_auroc,
    )
    return selected.train, selected.selection


# ---------------------------------------------------------------------------------------------
# child process 2: inference timing and evaluation


def _time_inference(detector: Any, images: np.ndarray, n_single: int) -> dict[str, float]:
    """Network speed as scoring calls it (``predict_arrays``: torch or the exported graph), at batch 1 and batched."""
    batch_size = detector.run_config.common.batch_size
    for _ in range(2):  # warm-up: allocator, one-off kernel selection
        detector.predict_arrays(images[:1])
    latencies = []
    for i in range(n_single):
        start = time.perf_counter()
        detector.predict_arrays(images[i % len(images)][None])
        latencies.append(time.perf_counter() - start)
    batch = np.concatenate([images] * (batch_size // len(images) + 1))[:batch_size]
    detector.predict_arrays(batch)
    rounds = max(2, n_single // batch_size)
    start = time.perf_counter()
    for _ in range(rounds):
        detector.predict_arrays(batch)
    batched = time.perf_counter() - start
    latencies.sort()
    return {
        "inference_images_per_s_batch1": round(len(latencies) / sum(latencies), 3),
        "inference_images_per_s_batched": round(rounds * batch_size / batched, 3),
        "batched_batch_size": batch_size,
        "latency_ms_p50": round(1000 * statistics.median(latencies), 2),
        "latency_ms_p95": round(1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
    }


def _evaluate(
    samples: list[TestSample], scores: list[float], maps: list[np.ndarray | None], threshold: float, has_masks: bool
) -> dict[str, Any]:
    from surfaceinspect.analysis import metrics
    from surfaceinspect.data.imageio import read_mask

    labels = np.array([s.is_anomalous for s in samples], dtype=bool)
    score_arr = np.array(scores, dtype=np.float64)
    best_f1, best_thr = metrics.best_f1(labels, score_arr)
    out: dict[str, Any] = {
        "image_auroc": metrics.image_auroc(labels, score_arr),
        "image_ap": metrics.average_precision(labels, score_arr),
        "f1_calibrated": metrics.f1_at_threshold(labels, score_arr, threshold),
        "f1_best": best_f1,
        "f1_best_threshold": best_thr,
        "threshold": threshold,
        "false_reject_rate_test": float(np.mean(score_arr[~labels] >= threshold)) if (~labels).any() else float("nan"),
        "recall_test": float(np.mean(score_arr[labels] >= threshold)) if labels.any() else float("nan"),
        "pixel_auroc": None,
        "aupro": None,
        "n_empty_masks": 0,
    }
    masks: list[np.ndarray] = []
    if has_masks:
        for sample, amap in zip(samples, maps, strict=True):
            assert amap is not None
            if sample.mask_path is not None:
                mask = read_mask(sample.mask_path)
                if mask.shape != amap.shape:
                    raise ConfigError(f"mask {sample.mask_path} is {mask.shape}, its image {amap.shape}")
            else:
                mask = np.zeros(amap.shape, dtype=bool)
            if sample.is_anomalous and not mask.any():
                out["n_empty_masks"] += 1
            masks.append(mask)
        out["pixel_auroc"] = metrics.pixel_auroc(masks, maps)
        out["aupro"] = metrics.aupro(masks, maps, fpr_limit=0.3)
    per_type: dict[str, Any] = {}
    good_idx = [i for i, s in enumerate(samples) if not s.is_anomalous]
    for defect_type in sorted({s.defect_type for s in samples if s.is_anomalous}):
        idx = good_idx + [i for i, s in enumerate(samples) if s.defect_type == defect_type]
        entry: dict[str, Any] = {
            "n": sum(1 for s in samples if s.defect_type == defect_type),
            "image_auroc": metrics.image_auroc(labels[idx], score_arr[idx]),
            "recall_test": float(np.mean(score_arr[[i for i in idx if labels[i]]] >= threshold)),
        }
        if has_masks:
            entry["pixel_auroc"] = metrics.pixel_auroc([masks[i] for i in idx], [maps[i] for i in idx])
            entry["aupro"] = metrics.aupro([masks[i] for i in idx], [maps[i] for i in idx], fpr_limit=0.3)
        per_type[defect_type] = entry
    out["per_defect_type"] = per_type
    roc_fpr, roc_tpr = metrics.roc_curve(labels, score_arr)
    out["_roc"] = (roc_fpr.tolist(), roc_tpr.tolist())
    return out


def _eval_child(args: dict[str, Any], queue: Any) -> None:
    try:
        from surfaceinspect import engine
        from surfaceinspect.data.streaming import iterate_images, stack_images

        reporter = Reporter(quiet=args["quiet"])
        model = engine.load(
            Path(args["run_dir"]), device=args["device"] or "auto", inference_sets=args["inference_sets"]
        )
        if args["inference_sets"]:
            model.calibration = _recalibrate_on_held_out(model, reporter)
        samples = [TestSample(Path(p), t, a, Path(m) if m else None) for p, t, a, m in args["samples"]]
        common = model.detector.run_config.common
        n_single = QUICK_TIMING_IMAGES if args["quick"] else TIMING_IMAGES
        timing_paths = [s.path for s in samples][: max(n_single, common.batch_size)]
        timing_images = [
            stack_images([i for i in batch if i.image is not None])
            for batch in iterate_images(timing_paths, common.input_hw(), common.batch_size, 0)
        ]
        timings = _time_inference(model.detector, np.concatenate(timing_images), n_single)
        timings["peak_rss_inference_mb"] = peak_rss_mb()
        scores: list[float] = []
        maps: list[np.ndarray | None] = []
        started = time.monotonic()
        errors = []
        with reporter.progress(f"evaluate {args['label']}", len(samples)) as bar:
            for result in engine.run_inference(
                [s.path for s in samples],
                Path(args["dataset"]),
                model.detector,
                model.calibration,
                batch_size=common.batch_size,
                workers=common.workers,
            ):
                bar.update(advance=1)
                if result.record.verdict == "error":
                    errors.append(f"{result.record.path}: {result.record.error}")
                    continue
                scores.append(float(result.record.score))
                maps.append(result.anomaly_map if args["has_masks"] else None)
        if errors:
            raise ConfigError(f"{len(errors)} test images could not be scored, first: {errors[0]}")
        timings["end_to_end_images_per_s"] = round(len(samples) / (time.monotonic() - started), 3)
        accuracy = _evaluate(samples, scores, maps, model.calibration.image_threshold, args["has_masks"])
        held_out = _held_out_scores(model, reporter)
        labels = [s.is_anomalous for s in samples]
        estimator = model.detector.run_config.common.calibration.estimator
        accuracy["operating_points"] = real_operating_points(held_out, scores, labels, estimator)
        accuracy["scores"] = {"held_out_good": held_out, "test": [round(v, 6) for v in scores], "test_labels": labels}
        queue.put(
            {
                "ok": True,
                "timings": timings,
                "accuracy": accuracy,
                "calibration": model.calibration.to_dict(),
                "config": model.detector.run_config.to_dict(),  # effective: overrides included
            }
        )
    except SurfaceInspectError as exc:
        queue.put({"ok": False, "error": str(exc)})
    except Exception as exc:  # noqa: BLE001 - reported in the benchmark, not a crash of the parent
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


OPERATING_TARGETS = (0.01, 0.02, 0.05)


def _held_out_scores(model: Any, reporter: Reporter) -> list[float]:
    """Scores of the run's held-out good images (its calibration images); [] if it was calibrated on a folder."""
    from surfaceinspect.workflows.auto import score_paths

    root = Path(model.metadata["dataset"]["root"])
    paths = [root / name for name in model.metadata.get("calibration_files", [])]
    return [round(v, 6) for v in score_paths(model.detector, paths, reporter, "held-out") if np.isfinite(v)]


def real_operating_points(
    held_out: list[float], scores: list[float], labels: list[bool], estimator: str = "auto"
) -> list[dict[str, Any]]:
    """Real false-reject rate and recall on the test set at thresholds set for each false-reject target
    from the held-out good scores, by ``estimator`` as calibration does (``common.calibration.estimator``)."""
    from surfaceinspect.analysis.calibration import threshold_for

    if not held_out:
        return []
    test, is_defect = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    points = []
    for target in OPERATING_TARGETS:
        threshold = threshold_for(np.asarray(held_out), target, estimator)
        flagged = test >= threshold
        points.append(
            {
                "false_reject_target": target,
                "threshold": round(float(threshold), 6),
                "false_reject_test": round(float(flagged[~is_defect].mean()), 4) if (~is_defect).any() else None,
                "recall_test": round(float(flagged[is_defect].mean()), 4) if is_defect.any() else None,
            }
        )
    return points


def _recalibrate_on_held_out(model: Any, reporter: Reporter) -> Any:
    """Calibrate again on the run's own held-out images (other inference settings change the scores)."""
    from surfaceinspect import engine

    root = Path(model.metadata["dataset"]["root"])
    held_out = [root / name for name in model.metadata.get("calibration_files", [])]
    if not held_out:
        raise ConfigError(
            f"{model.run_dir} was calibrated on a labelled folder, so its held-out images are unknown; "
            "inference settings can only be changed on runs calibrated on held-out good images"
        )
    config = model.detector.run_config
    return engine.calibrate_detector(model.detector, held_out, root, config, reporter, source=f"held-out of {root}")


def _run_child(target: Any, args: dict[str, Any]) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(args, queue))
    process.start()
    result: dict[str, Any] | None = None
    while result is None:
        try:
            result = queue.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty: check the child is still alive
            if not process.is_alive():
                process.join()
                if queue.empty():
                    return {"ok": False, "error": f"child process died with exit code {process.exitcode}"}
    process.join()
    return result


# ---------------------------------------------------------------------------------------------
# Orchestration and reports


def machine_info(device: str | None) -> dict[str, Any]:
    from surfaceinspect.device import available_cores

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": available_cores(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device_requested": device or "auto",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "surfaceinspect": surfaceinspect.__version__,
    }


def run_benchmark(options: BenchmarkOptions, reporter: Reporter) -> dict[str, Any]:
    """Run every dataset x method (x seed); write report.json, report.md and roc_<dataset>.png to ``out_dir``."""
    _check_options(options)
    loaded = [(root, load_mvtec(root)) for root in options.datasets]
    options.out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": options.quick,
        "machine": machine_info(options.device),
        "entries": [],
        "aggregates": [],
    }
    rocs: dict[str, dict[str, tuple[list[float], list[float], float]]] = {}
    for root, ds in loaded:
        train_files, samples = _quick_subset(ds) if options.quick else (list(ds.train_good), list(ds.test))
        for method in options.methods:
            for seed in options.seeds or [None]:
                entry, roc = _benchmark_one(options, reporter, root, ds, method, seed, train_files, samples)
                name = method if seed is None or len(options.seeds) == 1 else f"{method} seed {seed}"
                rocs.setdefault(root.name, {})[name] = roc
                report["entries"].append(entry)
                report["aggregates"] = aggregate_seeds(report["entries"])
                write_json_atomic(options.out_dir / "report.json", report)  # partial results survive a crash
    _write_outputs(report, rocs, options.out_dir)
    return report


def _check_options(options: BenchmarkOptions) -> None:
    from surfaceinspect.detectors import get_detector_class

    if options.model_dir is not None and (len(options.datasets) != 1 or len(options.methods) != 1):
        raise ConfigError("--model evaluates one trained run: give one dataset and one --method")
    if options.model_dir is not None and options.keep_models is not None:
        raise ConfigError("--keep-models keeps the runs that benchmark trains; with --model nothing is trained")
    if options.model_dir is not None and options.seeds:
        raise ConfigError("--seed trains once per seed; with --model nothing is trained")
    if len(set(options.seeds)) != len(options.seeds):
        raise ConfigError(f"--seed given twice with the same value ({options.seeds}); give each seed once")
    for method in options.methods:
        if method == AUTO:
            if options.profile is not None or options.config_file is not None:
                raise ConfigError("--method auto picks each candidate's profile; drop --profile/--config")
            continue
        get_detector_class(method)  # fail early on a typo


def _benchmark_one(
    options: BenchmarkOptions,
    reporter: Reporter,
    root: Path,
    ds: MVTecDataset,
    method: str,
    seed: int | None,
    train_files: list[Path],
    samples: list[TestSample],
) -> tuple[dict[str, Any], tuple[list[float], list[float], float]]:
    """Train (unless --model) and evaluate one dataset x method x seed; the report entry and ROC curve."""
    label = f"{root.name}/{method}" + (f"/seed {seed}" if seed is not None else "")
    reporter.info((f"benchmark {label}", "bold"), f": {len(train_files)} train, {len(samples)} test images")
    entry: dict[str, Any] = {
        "dataset": root.name,
        "dataset_root": str(root),
        "method": method,
        "profile": options.profile,
        "seed": seed,
        "n_train_images": len(train_files),
        "n_test_good": sum(not s.is_anomalous for s in samples),
        "n_test_defective": sum(s.is_anomalous for s in samples),
        "has_masks": ds.has_masks,
    }
    common = {"quiet": reporter.quiet, "device": options.device, "quick": options.quick}
    with tempfile.TemporaryDirectory(prefix="si-bench-") as tmp:
        if options.model_dir is not None:
            run_dir = options.model_dir
        elif options.keep_models is not None:
            suffix = f"-seed{seed}" if seed is not None and len(options.seeds) > 1 else ""
            run_dir = options.keep_models / f"{root.name}-{method}{suffix}"
        else:
            run_dir = Path(tmp) / "run"
        if options.model_dir is None:
            sets = list(options.sets) + ([f"common.seed={seed}"] if seed is not None else [])
            trained = _run_child(
                _train_child,
                {
                    **common,
                    "method": method,
                    "profile": options.profile,
                    "config_file": options.config_file,
                    "sets": sets,
                    "dataset": str(root),
                    "run_dir": str(run_dir),
                    "train_files": [str(p) for p in train_files],
                    "samples": [(str(s.path), s.defect_type, s.is_anomalous, "") for s in samples],
                },
            )
            if not trained["ok"]:
                raise ConfigError(f"benchmark {label}: training failed: {trained['error']}")
            entry["training"] = _training_entry(trained)
            if trained.get("selection") is not None:
                entry["selection"] = trained["selection"]
        evaluated = _run_child(
            _eval_child,
            {
                **common,
                "run_dir": str(run_dir),
                "dataset": str(root),
                "label": label,
                "has_masks": ds.has_masks,
                "inference_sets": list(options.sets) if options.model_dir is not None else [],
                "samples": [(str(s.path), s.defect_type, s.is_anomalous, str(s.mask_path or "")) for s in samples],
            },
        )
    if not evaluated["ok"]:
        raise ConfigError(f"benchmark {label}: evaluation failed: {evaluated['error']}")
    accuracy = evaluated["accuracy"]
    fpr, tpr = accuracy.pop("_roc")
    entry["profile"] = evaluated["config"].get("profile", options.profile)
    entry["seed"] = evaluated["config"]["common"]["seed"]
    entry["config"] = evaluated["config"]
    entry["accuracy"] = accuracy
    entry["inference"] = evaluated["timings"]
    entry["calibration"] = {
        k: evaluated["calibration"][k] for k in ("mode", "n_good", "image_threshold", "guaranteed_false_reject_rate")
    }
    if "training" in entry:
        entry["training"]["n_calibration_images"] = evaluated["calibration"]["n_good"]
    return entry, (fpr, tpr, accuracy["image_auroc"])


def _training_entry(trained: dict[str, Any]) -> dict[str, Any]:
    summary = trained["summary"]
    return {
        "train_seconds": trained["train_seconds"],
        "fit_seconds": summary.get("seconds"),
        "epochs": summary.get("epochs"),
        "steps": summary.get("steps"),
        "train_images_per_s_first_epoch": summary.get("images_per_s_first_epoch"),
        "train_images_per_s_later_epochs": summary.get("images_per_s_later_epochs"),
        "peak_rss_train_mb": trained["peak_rss_train_mb"],
        "threads": trained["threads"],
        "n_calibration_images": None,
        "summary": summary,
    }


def _write_outputs(report: dict[str, Any], rocs: dict[str, Any], out_dir: Path) -> None:
    from surfaceinspect.analysis.rendering import plot_roc

    for dataset, curves in rocs.items():
        plot_roc(
            {m: (np.array(f), np.array(t), a) for m, (f, t, a) in curves.items()},
            out_dir / f"roc_{dataset}.png",
            title=f"Image-level ROC — {dataset}",
        )
    write_json_atomic(out_dir / "report.json", report)
    write_text_atomic(out_dir / "report.md", report_markdown(report, sorted(rocs)))
