"""``--method auto``: train candidate detectors briefly, rank them on held-out evidence, finish the best.

No method x profile wins on every surface (BENCHMARKS.md), and a factory team cannot tell which
one suits its images. So ``train --method auto``:

1. trains every candidate (both methods' ``cpu`` and ``texture`` profiles, plus aspect-keeping
   variants for images far from square) for the first ``auto.probe_steps`` optimiser steps of its
   own schedule (a probe: exactly the start of the full run, checkpointed there);
2. scores each probe on the held-out good images and on synthetic anomalies made from them of
   families no candidate trains on (:mod:`surfaceinspect.data.evidence`), or on real defect images
   when the user has some (``--defects DIR`` or a labelled ``--calibration-dir``), which outrank
   the synthetic ones;
3. continues the best candidate from its probe checkpoint to the end of its schedule, within what
   is left of the time budget, and calibrates it as ``train`` does;
4. stores the candidate table (figures, minutes, the choice and why) and the expected catch rate
   of synthetic anomalies at a few false-reject targets in the model's metadata.

Every stage is recorded in ``auto.json`` in the run directory, so ``train --resume`` continues an
interrupted selection where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surfaceinspect import engine
from surfaceinspect.analysis.calibration import Calibration, threshold_for
from surfaceinspect.analysis.metrics import image_auroc
from surfaceinspect.config import RunConfig, dataclass_from_dict, parse_set_option
from surfaceinspect.data.evidence import EvidenceImage, write_evidence
from surfaceinspect.errors import ConfigError, ModelDirError
from surfaceinspect.profiles import resolve_run_config
from surfaceinspect.storage import modeldir
from surfaceinspect.storage.atomic import write_json_atomic
from surfaceinspect.storage.outputs import lock_output
from surfaceinspect.ui import Reporter
from surfaceinspect.workflows import selection

AUTO_STATE_FILE = modeldir.AUTO_STATE_FILE
CANDIDATES_DIR = modeldir.CANDIDATES_DIR
SELECTION_SCORES_FILE = modeldir.SELECTION_SCORES_FILE
STATE_VERSION = 1
DEFAULT_BUDGET_MIN = 30.0
# False-reject targets at which train reports the expected catch rate (the line runs at one of them).
OPERATING_TARGETS = (0.01, 0.02, 0.05)
# Images whose median aspect (width / height) lies beyond this factor from square also get
# aspect-keeping variants of the `cpu` profiles (same pixel count as the square input).
ASPECT_LIMIT = 1.6
# Seconds kept free at the end of the budget for calibration and saving.
_FINISH_RESERVE_S = 45.0


@dataclass(frozen=True)
class Candidate:
    """One detector ``train --method auto`` tries: a method, a profile and extra settings."""

    name: str
    method: str
    profile: str
    sets: tuple[str, ...] = ()


# Ordered by training cost: on a tie the cheaper candidate wins.
BASE_CANDIDATES = (
    Candidate("csflow-cpu", "csflow", "cpu"),
    Candidate("draem-cpu", "draem", "cpu"),
    Candidate("draem-texture", "draem", "texture"),
    Candidate("csflow-texture", "csflow", "texture"),
)


@dataclass
class AutoSettings:
    """``auto.*`` settings (``--set auto.KEY=VALUE``)."""

    probe_steps: int = 300  # optimiser steps of each candidate's probe (the start of its own schedule)
    synthetic_anomalies: int = 225  # at least this many (ceil(N / held-out good images) from each of them)
    candidates: list[str] = field(default_factory=list)  # restrict to these names ([] = all that apply)

    def validate(self) -> None:
        if self.probe_steps < 1:
            raise ConfigError(f"auto.probe_steps={self.probe_steps}: use at least 1 (e.g. 300)")
        if self.synthetic_anomalies < 1:
            raise ConfigError(f"auto.synthetic_anomalies={self.synthetic_anomalies}: use at least 1 (e.g. 225)")

    def per_image(self, n_good: int) -> int:
        """Synthetic anomalies to make from each of ``n_good`` held-out good images."""
        return max(1, math.ceil(self.synthetic_anomalies / max(1, n_good)))


@dataclass
class AutoRequest:
    """What the user asked for: flags and ``--set`` items as ``train`` passes them to every candidate."""

    common_flags: dict[str, Any] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)


@dataclass
class AutoResult:
    """A finished ``--method auto`` run: the winner's training result and the candidate table."""

    train: engine.TrainResult
    selection: dict[str, Any]


CandidateHook = Callable[[str, Any], dict[str, Any]]  # (candidate name, detector) -> extra table columns


# ---------------------------------------------------------------------------------------------
# Candidates and their configurations


def split_sets(sets: Sequence[str]) -> tuple[dict[str, list[str]], AutoSettings]:
    """``--set`` items by section (``common``/method names) and the ``auto.*`` settings parsed."""
    by_section: dict[str, list[str]] = {}
    auto_layer: dict[str, Any] = {}
    for item in sets:
        section = item.split("=", 1)[0].strip().split(".", 1)[0]
        if section == "auto":
            auto_layer.update(parse_set_option(item)["auto"])
        else:
            by_section.setdefault(section, []).append(item)
    settings = dataclass_from_dict(AutoSettings, auto_layer, prefix="auto")
    settings.validate()
    return by_section, settings


def plan_candidates(train_files: Sequence[Path], settings: AutoSettings) -> list[Candidate]:
    """The candidates for these training images.

    By default the base candidates, plus aspect-keeping `cpu` variants where the images are far from
    square. ``auto.candidates`` names them instead: any of those names, or ``METHOD-PROFILE`` of
    any registered method and installed profile (a new method takes part without touching this file).
    """
    candidates = list(BASE_CANDIDATES)
    aspect = engine.median_aspect(train_files)
    if aspect is not None and max(aspect, 1.0 / aspect) > ASPECT_LIMIT:
        stretch = math.sqrt(max(aspect, 1.0 / aspect))  # long side for the square input's pixel count
        keep = [(f"{m}-cpu-keep", m, round(side * stretch)) for m, side in (("csflow", 256), ("draem", 128))]
        candidates[1:1] = [Candidate(name, m, "cpu", (f"common.image_size=keep:{long}",)) for name, m, long in keep]
    if not settings.candidates:
        return candidates
    known = {c.name: c for c in candidates}
    return [known.get(name) or _named_candidate(name) for name in dict.fromkeys(settings.candidates)]


def _named_candidate(name: str) -> Candidate:
    """``METHOD-PROFILE`` as a candidate (a ConfigError naming the choices otherwise)."""
    from surfaceinspect.config import profile_path
    from surfaceinspect.detectors import available_methods

    method, _, profile = name.partition("-")
    if method not in available_methods() or not profile:
        names = ", ".join(c.name for c in BASE_CANDIDATES)
        raise ConfigError(f"auto.candidates: {name!r} is not METHOD-PROFILE (e.g. {names})")
    profile_path(method, profile)  # an unknown profile fails here, listing the method's profiles
    return Candidate(name, method, profile)


def candidate_config(candidate: Candidate, request: AutoRequest, by_section: dict[str, list[str]]) -> RunConfig:
    """The candidate's configuration: its profile, the user's common flags and settings, no time budget.

    Probes count steps, not seconds (their figures do not depend on the machine's load); the
    winner gets the rest of the budget when it continues.
    """
    sets = [*by_section.get("common", []), *by_section.get(candidate.method, []), *candidate.sets]
    flags = {k: v for k, v in request.common_flags.items() if k != "time_budget_min"}
    return resolve_run_config(
        method=candidate.method,
        profile=candidate.profile,
        common_flags=flags,
        sets=[*sets, "common.time_budget_min=0"],
    )


def shared_config(request: AutoRequest, by_section: dict[str, list[str]], settings: AutoSettings) -> RunConfig:
    """The first candidate's configuration: its common settings (split, seed) hold for every candidate."""
    return candidate_config(plan_candidates([], settings)[0], request, by_section)


def budget_minutes(request: AutoRequest, by_section: dict[str, list[str]]) -> float:
    """The whole selection's time budget: ``--time-budget`` / ``common.time_budget_min``, default 30."""
    value: Any = request.common_flags.get("time_budget_min")
    for item in by_section.get("common", []):
        if item.split("=", 1)[0].strip() == "common.time_budget_min":
            value = parse_set_option(item)["common"]["time_budget_min"]
    if value is None:
        return DEFAULT_BUDGET_MIN
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"common.time_budget_min={value!r}: use minutes, e.g. 30 (0 = no budget)") from None
    if not math.isfinite(minutes) or minutes < 0:
        raise ConfigError(f"common.time_budget_min={value!r}: use minutes >= 0, e.g. 30 (0 = no budget)")
    return minutes


# ---------------------------------------------------------------------------------------------
# The run: plan, probes, selection, the winner's full schedule


def train_auto(
    data_dir: Path,
    request: AutoRequest,
    *,
    reporter: Reporter,
    run_dir: Path | None = None,
    calibration_dir: Path | None = None,
    defects_dir: Path | None = None,
    files: Sequence[Path] | None = None,
    force: bool = False,
    mark_latest: bool = False,
    on_candidate: CandidateHook | None = None,
) -> AutoResult:
    """Train ``--method auto`` on ``data_dir`` into ``run_dir`` (see the module's docstring)."""
    data_dir = data_dir.absolute()
    calibration_dir = calibration_dir.absolute() if calibration_dir is not None else None
    defects_dir = defects_dir.absolute() if defects_dir is not None else None
    files = [f.absolute() for f in files] if files is not None else None
    by_section, settings = split_sets(request.sets)
    budget = budget_minutes(request, by_section)
    probe_config = shared_config(request, by_section, settings)
    engine.require_labelled_calibration(probe_config, calibration_dir)
    train_files, calibration_files = engine.training_split(data_dir, probe_config, calibration_dir, files, reporter)
    candidates = plan_candidates(train_files, settings)
    for candidate in candidates:  # every configuration and resource is checked before any work
        candidate_config(candidate, request, by_section).method_config.check_resources()
    if defects_dir is not None:
        engine.require_input(defects_dir)
        if not engine.find_images(defects_dir, reporter):
            raise ConfigError(f"--defects {defects_dir} holds no images; give a folder of real defect images")
    inputs = [data_dir, *(d for d in (calibration_dir, defects_dir) if d is not None)]
    run_dir, lock = engine.prepare_run_dir(run_dir, "auto", inputs, force, reporter)
    state = {
        "version": STATE_VERSION,
        "data_dir": str(data_dir),
        "calibration_dir": str(calibration_dir) if calibration_dir else None,
        "defects_dir": str(defects_dir) if defects_dir else None,
        "request": {"common_flags": request.common_flags, "sets": request.sets},
        "budget_min": budget,
        "settings": dataclasses.asdict(settings),
        "candidates": [dataclasses.asdict(c) for c in candidates],
        "train_files": [engine.relative_name(p, data_dir) for p in train_files],
        "calibration_files": [engine.relative_name(p, data_dir) for p in calibration_files],
        "results": {},
        "winner": None,
        "evidence_s": 0.0,
    }
    try:  # the run directory stays locked while this process writes it (a second train into it is refused)
        _save_state(run_dir, state)
        return _run(run_dir, state, reporter, mark_latest, on_candidate)
    finally:
        lock.release()


def is_auto_run(run_dir: Path) -> bool:
    """True for the run directory of an unfinished ``--method auto`` training."""
    return (run_dir / AUTO_STATE_FILE).is_file()


def resume_auto(
    run_dir: Path, *, reporter: Reporter, mark_latest: bool = False, on_candidate: CandidateHook | None = None
) -> AutoResult:
    """Continue an interrupted ``--method auto`` run where its ``auto.json`` says it stopped."""
    try:
        state = json.loads((run_dir / AUTO_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelDirError(f"{run_dir / AUTO_STATE_FILE} is unreadable; start a new run with --force") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ModelDirError(f"{run_dir / AUTO_STATE_FILE} is from another surfaceinspect version; start a new run")
    reporter.info(f"resuming the detector selection in {run_dir}")
    with lock_output(run_dir, "--resume", None):
        return _run(run_dir, state, reporter, mark_latest, on_candidate)


def _save_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_json_atomic(run_dir / AUTO_STATE_FILE, state)


@dataclass
class _Evidence:
    """What every candidate is scored on: held-out good images, synthetic anomalies, real defects."""

    good: list[Path]
    synthetic: list[EvidenceImage]
    real: list[Path]

    def paths(self) -> list[Path]:
        return [*self.good, *(e.path for e in self.synthetic), *self.real]


def _run(
    run_dir: Path,
    state: dict[str, Any],
    reporter: Reporter,
    mark_latest: bool,
    on_candidate: CandidateHook | None,
) -> AutoResult:
    request = AutoRequest(**state["request"])
    by_section, settings = split_sets(request.sets)
    candidates = [Candidate(c["name"], c["method"], c["profile"], tuple(c["sets"])) for c in state["candidates"]]
    started = time.monotonic()
    evidence = _make_evidence(run_dir, state, settings, request, by_section, reporter)
    state["evidence_s"] = round(float(state["evidence_s"]) + time.monotonic() - started, 2)
    _save_state(run_dir, state)
    for candidate in candidates:
        if candidate.name not in state["results"]:
            result = _probe(candidate, run_dir, state, evidence, settings, request, by_section, reporter, on_candidate)
            state["results"][candidate.name] = result
            _save_state(run_dir, state)
    if state["winner"] is None:
        ranking = _ranking([state["results"][c.name] for c in candidates], [e.kind for e in evidence.synthetic])
        state["winner"], state["reason"] = ranking.winner, ranking.reason
        state["ranking"] = dataclasses.asdict(ranking)
        _save_state(run_dir, state)
    reporter.info("chosen: ", (state["winner"], "bold"), f" ({state['reason']})")
    result = _finish_winner(run_dir, state, evidence, reporter, mark_latest)
    shutil.rmtree(run_dir / CANDIDATES_DIR, ignore_errors=True)
    (run_dir / AUTO_STATE_FILE).unlink(missing_ok=True)
    return result


def _make_evidence(
    run_dir: Path,
    state: dict[str, Any],
    settings: AutoSettings,
    request: AutoRequest,
    by_section: dict[str, list[str]],
    reporter: Reporter,
) -> _Evidence:
    """Write the synthetic anomalies (deterministic per seed, so a resumed run rebuilds the same set)."""
    data_dir = Path(state["data_dir"])
    real: list[Path] = []
    if state["calibration_dir"]:
        good, real = engine.labelled_split(Path(state["calibration_dir"]))
    else:
        good = [data_dir / name for name in state["calibration_files"]]
    if state["defects_dir"]:
        real += engine.find_images(Path(state["defects_dir"]), reporter)
    seed = shared_config(request, by_section, settings).common.seed
    folder = run_dir / CANDIDATES_DIR / "evidence"
    synthetic = write_evidence(
        good, folder, seed=seed, per_image=settings.per_image(len(good)), reporter_warn=reporter.warn
    )
    what = f"{len(good)} held-out good images, {len(synthetic)} synthetic anomalies"
    reporter.info(f"evidence: {what}" + (f", {len(real)} real defect images" if real else ""))
    return _Evidence(good, synthetic, real)


def _probe(
    candidate: Candidate,
    run_dir: Path,
    state: dict[str, Any],
    evidence: _Evidence,
    settings: AutoSettings,
    request: AutoRequest,
    by_section: dict[str, list[str]],
    reporter: Reporter,
    on_candidate: CandidateHook | None,
) -> dict[str, Any]:
    """Train ``candidate`` for its probe steps (or continue its probe checkpoint), score it on the evidence."""
    cand_dir = run_dir / CANDIDATES_DIR / candidate.name
    reporter.info("candidate ", (candidate.name, "bold"), f": the first {settings.probe_steps} steps of its schedule")
    if (cand_dir / modeldir.CHECKPOINT_FILE).is_file():
        plan = engine.plan_resume(cand_dir, reporter=reporter)
    else:
        run_config = candidate_config(candidate, request, by_section)
        data_dir = Path(state["data_dir"])
        train_files = [data_dir / name for name in state["train_files"]]
        engine.resolve_geometry(run_config, train_files, reporter)
        cand_dir.mkdir(parents=True, exist_ok=True)
        calibration_dir = Path(state["calibration_dir"]) if state["calibration_dir"] else None
        calibration_files = [data_dir / name for name in state["calibration_files"]]
        plan = engine.TrainingPlan(run_config, data_dir, train_files, calibration_files, calibration_dir, cand_dir)
    fitted = engine.fit_plan(plan, reporter=reporter, pause_at_step=settings.probe_steps)
    scored = _score(fitted.detector, evidence, reporter, candidate.name)
    result: dict[str, Any] = {
        **dataclasses.asdict(candidate),
        "steps": fitted.paused_at,
        "planned_steps": fitted.planned_steps,
        "train_s": round(fitted.train_seconds, 1),
        **scored,
    }
    if on_candidate is not None:
        result.update(on_candidate(candidate.name, fitted.detector))
    return result


def score_paths(detector: Any, paths: Sequence[Path], reporter: Reporter, label: str) -> list[float]:
    """Image scores of ``paths`` as ``score`` computes them (nan for an image that cannot be scored)."""
    common = detector.run_config.common
    scores: list[float] = []
    with reporter.progress(label, len(paths)) as bar:
        for result in engine.run_inference(
            paths, Path("/"), detector, None, batch_size=common.batch_size, workers=common.workers,
            full_resolution_maps=False,
        ):  # fmt: skip
            bar.update(advance=1)
            ok = result.record.verdict != "error" and result.record.score is not None
            scores.append(float(result.record.score) if ok else math.nan)
    return scores


def _score(detector: Any, evidence: _Evidence, reporter: Reporter, name: str) -> dict[str, Any]:
    """Image scores of the evidence and what they say: AUROC (synthetic, per kind, real), speed."""
    paths = evidence.paths()
    started = time.monotonic()
    scores = score_paths(detector, paths, reporter, f"score {name}")
    seconds = time.monotonic() - started
    n_good, n_syn = len(evidence.good), len(evidence.synthetic)
    good = np.array(scores[:n_good])
    synthetic = np.array(scores[n_good : n_good + n_syn])
    real = np.array(scores[n_good + n_syn :])
    kinds = [e.kind for e in evidence.synthetic]
    return {
        "auroc_synthetic": _auroc(good, synthetic),
        "auroc_by_kind": {
            k: _auroc(good, synthetic[[i for i, x in enumerate(kinds) if x == k]]) for k in sorted(set(kinds))
        },
        "auroc_real": _auroc(good, real) if real.size else None,
        "score_s": round(seconds, 1),
        "images_per_s": round(len(paths) / seconds, 2) if seconds > 0 else None,
        "good_scores": _rounded(good),
        "synthetic_scores": _rounded(synthetic),
        "real_scores": _rounded(real),
    }


def _auroc(good: np.ndarray, anomalous: np.ndarray) -> float | None:
    """AUROC of good vs anomalous scores, over the images that could be scored (None if a side has none)."""
    good, anomalous = good[np.isfinite(good)], anomalous[np.isfinite(anomalous)]
    if good.size == 0 or anomalous.size == 0:
        return None
    labels = np.r_[np.zeros(good.size), np.ones(anomalous.size)]
    return round(image_auroc(labels, np.r_[good, anomalous]), 4)


def _rounded(values: np.ndarray) -> list[float | None]:
    return [round(float(v), 6) if math.isfinite(v) else None for v in values]


def select_winner(results: Sequence[dict[str, Any]], synthetic_kinds: Sequence[str] = ()) -> tuple[str, str]:
    """The best candidate and why: real-defect AUROC first (where there are real defects), then the
    synthetic evidence of the kinds some candidate detects (``surfaceinspect.workflows.selection``).

    ``results`` are in candidate order (cheapest first), which breaks exact ties.
    """
    ranking = _ranking(results, synthetic_kinds)
    return ranking.winner, ranking.reason


def _ranking(results: Sequence[dict[str, Any]], synthetic_kinds: Sequence[str]) -> selection.Ranking:
    if not results:
        raise ConfigError("--method auto: no candidate to choose from")
    return selection.rank_candidates(results, synthetic_kinds)


def _finish_winner(
    run_dir: Path, state: dict[str, Any], evidence: _Evidence, reporter: Reporter, mark_latest: bool
) -> AutoResult:
    """Continue the winner from its probe checkpoint (or its own later checkpoint) into ``run_dir``."""
    winner = state["winner"]
    if (run_dir / modeldir.CHECKPOINT_FILE).is_file():
        plan = engine.plan_resume(run_dir, reporter=reporter)
    else:
        plan = engine.plan_resume(run_dir / CANDIDATES_DIR / winner, reporter=reporter)
        plan.run_dir = run_dir
    budget_s = float(state["budget_min"]) * 60.0
    if budget_s > 0:
        # Everything but the winner's own training counts against the budget (its probe is part of its run).
        results = state["results"]
        spent = float(state["evidence_s"]) + sum(
            r["score_s"] + (0 if n == winner else r["train_s"]) for n, r in results.items()
        )
        plan.run_config.common.time_budget_min = max(1.0, (budget_s - spent - _FINISH_RESERVE_S) / 60.0)
    reporter.info(f"training {winner} to the end of its schedule")

    def selection_metadata(detector: Any, calibration: Calibration) -> dict[str, Any]:
        table = selection.selection_table(state)
        table["operating_points"] = operating_points(detector, calibration, evidence, reporter)
        state["selection"] = table
        # The evidence behind the choice (every candidate's raw scores) stays with the model, in its manifest.
        raw = {k: state[k] for k in ("candidates", "results", "winner")}
        raw["synthetic"] = [{"kind": e.kind, "area": e.area} for e in evidence.synthetic]
        raw["ranking"] = state.get("ranking")
        write_json_atomic(run_dir / SELECTION_SCORES_FILE, raw)
        return {"selection": table}

    trained = engine.execute_training(plan, reporter=reporter, mark_latest=mark_latest, metadata_fn=selection_metadata)
    return AutoResult(trained, state["selection"])


def operating_points(
    detector: Any, calibration: Calibration, evidence: _Evidence, reporter: Reporter
) -> list[dict[str, Any]]:
    """Expected catch rate of the synthetic anomalies (and real defects, if any) at the calibrated
    threshold and at thresholds for a few false-reject targets, from the finished model's scores."""
    scored = _score(detector, evidence, reporter, "operating points")
    good = np.array([v for v in scored["good_scores"] if v is not None])
    synthetic = np.array([v for v in scored["synthetic_scores"] if v is not None])
    real = np.array([v for v in scored["real_scores"] if v is not None])
    thresholds = [("calibrated", calibration.image_threshold)]
    estimator = detector.run_config.common.calibration.estimator
    thresholds += [(f"{t:g}", threshold_for(good, t, estimator)) for t in OPERATING_TARGETS] if good.size else []
    points = []
    for label, threshold in thresholds:
        point = {
            "false_reject_target": label,
            "threshold": round(float(threshold), 6),
            "false_reject_held_out": round(float(np.mean(good >= threshold)), 4) if good.size else None,
            "catch_synthetic": round(float(np.mean(synthetic >= threshold)), 4) if synthetic.size else None,
        }
        if real.size:
            point["catch_real"] = round(float(np.mean(real >= threshold)), 4)
        points.append(point)
    return points


# ---------------------------------------------------------------------------------------------
# What the user sees


def describe(request: AutoRequest) -> str:
    """``train --method auto --print-config``: the budget, the auto settings and every candidate's config."""
    by_section, settings = split_sets(request.sets)
    lines = [
        "# --method auto: each candidate trains for auto.probe_steps steps, the best continues to the end",
        f"# time budget for everything: {budget_minutes(request, by_section):g} min (0 = none)",
        f"auto: {json.dumps(dataclasses.asdict(settings))}",
        f"# plus {', '.join(f'{m}-cpu-keep' for m in ('csflow', 'draem'))} when the images' median aspect "
        f"is beyond {ASPECT_LIMIT:g}:1",
    ]
    for candidate in BASE_CANDIDATES:
        config = candidate_config(candidate, request, by_section)
        lines += ["---", f"# candidate {candidate.name}", config.to_yaml().rstrip()]
    return "\n".join(lines) + "\n"
