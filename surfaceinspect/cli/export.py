"""``surfaceinspect export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surfaceinspect import cli
from surfaceinspect.cli import common


@cli.app.command(
    "export",
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect export                                 (latest run -> RUN/export-onnx/)\n\n"
        "  surfaceinspect export --model RUN --out line3_model/\n\n"
        "  surfaceinspect export --images ./good_samples          (parity on these instead)\n\n"
        "  surfaceinspect score ./dump --runtime onnx             (score with the export)\n\n"
        "The folder holds model.onnx (image (B,3,H,W) float32 RGB in [0,1] -> score (B,), map (B,H,W), raw units), "
        "calibration.json and export.json (input contract, thresholds, parity result). Refused (exit 2, nothing "
        "written) if the exported graph disagrees with the torch model on the parity images."
    ),
)
@common.handle_errors
@common.run_options("threads", "quiet")
def export(
    model: common.ModelOpt = None,
    fmt: Annotated[str, typer.Option("--export-format", metavar="onnx", help="Artefact format (onnx).")] = "onnx",
    fmt_alias: Annotated[
        str | None, typer.Option("--format", hidden=True, help="Old spelling of --export-format.")
    ] = None,
    out: Annotated[
        Path | None,
        common.out_option(
            "New or empty DIR, or an earlier export (RUN/export-onnx is the one --runtime onnx uses).",
            show_default="RUN/export-onnx",
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            metavar="DIR",
            help="Images for the parity check.",
            show_default="the run's held-out calibration images",
        ),
    ] = None,
    n_images: Annotated[
        int, typer.Option("--parity-images", min=1, metavar="N", help="How many parity images (at most).")
    ] = 8,
    force: common.ForceOpt = False,
    *,
    run: common.RunOptions,
) -> None:
    """Export a trained model to ONNX, after checking that the export scores like it.

    The graph contains the whole inference (DRAEM's networks, softmax and smoothing; CS-Flow's
    backbone, flow and map post-processing) with a dynamic batch axis. Parity: scores and maps
    of the export agree with the torch model within 0.1% of max(|value|, threshold) on the
    parity images, and every verdict is identical (otherwise nothing is written). With OpenVINO
    installed, its parity is checked too and recorded for --runtime openvino. Tiled models export
    the per-tile graph; cutting tiles and blending their maps happen outside it (export.json says how).
    """
    from surfaceinspect.deploy.export import export_run

    common.require_full_install()
    reporter = run.reporter()
    loaded = run.load(model, reporter, "; exporting, then checking parity...", device="cpu", runtime="torch")
    result = export_run(
        loaded.run_dir,
        loaded.detector,
        loaded.calibration,
        loaded.metadata,
        out,
        fmt=common.old_spelling(fmt, "--export-format", fmt_alias, "--format", default="onnx"),
        images=images,
        n_images=n_images,
        force=force,
    )
    reporter.info(("exported", "green"), f" {result.out_dir}: parity on {result.parity.describe()}")
    for runtime, parity in result.parity_other.items():
        reporter.info(
            f"  {runtime}: " + ("parity passed" if parity["passed"] else parity.get("reason", "parity failed"))
        )
