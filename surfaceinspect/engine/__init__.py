"""The workflows behind the CLI: train (with calibration and resume), score, heatmap, recalibrate.

Method-independent: detectors are reached only through the Detector interface and the registry.
One module per workflow; every name the CLI, the benchmarks and the tests use is importable from
here (``engine.train``, ``engine.load``, ``engine.run_inference`` ...):

* :mod:`.inputs`: input folders and files (find_images, require_input, relative_name ...)
* :mod:`.checks`: reliability checks of scored images (colour, aspect)
* :mod:`.geometry`: aspect ratios, network input size, the texture-profile hint
* :mod:`.inference`: the inference core shared by score, heatmap, calibration and benchmark
* :mod:`.calibration`: thresholds from held-out good or labelled images
* :mod:`.training`: training plans, resume, fitting, the run directory
* :mod:`.loading`: a trained or exported model, ready to score
* :mod:`.recalibration`: recalibrate and its undo
* :mod:`.scoring` and :mod:`.heatmaps`: the score and heatmap commands' workflows
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from surfaceinspect.engine.calibration import (
    calibrate_detector,
    labelled_split,
)
from surfaceinspect.engine.checks import (
    AspectCheck,
    ColourCheck,
    ImageCheck,
    reliability_checks,
)
from surfaceinspect.engine.geometry import (
    _TEXTURE_STRUCTURE,
    ASPECT_RANGE_MARGIN,
    ASPECT_TOLERANCE,
    median_aspect,
    resolve_geometry,
    shared_structure,
    suggest_profile,
)
from surfaceinspect.engine.heatmaps import (
    heatmap_folder,
)
from surfaceinspect.engine.inference import (
    ImageResult,
    predict_items,
    run_inference,
)
from surfaceinspect.engine.inputs import (
    MAX_LISTED_FAILURES,
    colour_mode,
    find_images,
    refuse_labelled_folder,
    relative_name,
    require_input,
    split_calibration,
)
from surfaceinspect.engine.loading import (
    LoadedModel,
    load,
)
from surfaceinspect.engine.recalibration import (
    Recalibration,
    recalibrate,
    undo_recalibration,
)
from surfaceinspect.engine.scoring import (
    ScoreSummary,
    drift_monitor,
    score_folder,
)
from surfaceinspect.ui import Reporter

# Training needs torch; scoring an exported model must not import it (the install without torch),
# so the training names load on first use.
_TRAINING_NAMES = frozenset(
    {
        "FittedDetector",
        "TrainingPlan",
        "TrainResult",
        "execute_training",
        "fit_plan",
        "plan_resume",
        "plan_training",
        "prepare_run_dir",
        "require_labelled_calibration",
        "resume",
        "train",
        "training_split",
    }
)

if TYPE_CHECKING:
    from surfaceinspect.engine.training import (
        FittedDetector,
        TrainingPlan,
        TrainResult,
        execute_training,
        fit_plan,
        plan_resume,
        plan_training,
        prepare_run_dir,
        require_labelled_calibration,
        resume,
        train,
        training_split,
    )


def __getattr__(name: str) -> Any:
    if name in _TRAINING_NAMES:
        from surfaceinspect.engine import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ASPECT_RANGE_MARGIN",
    "ASPECT_TOLERANCE",
    "MAX_LISTED_FAILURES",
    "_TEXTURE_STRUCTURE",
    "AspectCheck",
    "ColourCheck",
    "FittedDetector",
    "ImageCheck",
    "ImageResult",
    "LoadedModel",
    "Recalibration",
    "Reporter",
    "ScoreSummary",
    "TrainResult",
    "TrainingPlan",
    "calibrate_detector",
    "colour_mode",
    "drift_monitor",
    "execute_training",
    "find_images",
    "fit_plan",
    "heatmap_folder",
    "labelled_split",
    "load",
    "median_aspect",
    "plan_resume",
    "plan_training",
    "predict_items",
    "prepare_run_dir",
    "recalibrate",
    "refuse_labelled_folder",
    "relative_name",
    "reliability_checks",
    "require_input",
    "require_labelled_calibration",
    "resolve_geometry",
    "resume",
    "run_inference",
    "score_folder",
    "shared_structure",
    "split_calibration",
    "suggest_profile",
    "train",
    "training_split",
    "undo_recalibration",
]
