"""``surfaceinspect demo``: the whole workflow on a generated dataset, in a few minutes on a CPU."""

from __future__ import annotations

from pathlib import Path

from surfaceinspect import engine
from surfaceinspect.data.synthetic import make_dataset
from surfaceinspect.deploy.export import export_after_training
from surfaceinspect.profiles import resolve_run_config
from surfaceinspect.storage.outputs import prepare_output_dir
from surfaceinspect.storage.records import RecordWriter
from surfaceinspect.ui import Reporter

DEMO_TIME_BUDGET_MIN = 1.5  # per method: training is fitted into this budget


def run_demo(out_dir: Path, methods: list[str], reporter: Reporter) -> list[str]:
    """Generate data, then per method: train (cpu profile, time-boxed), score, heatmap. Returns summary lines.

    ``out_dir`` is new, empty or an earlier demo output (whose models and outputs are replaced).
    """
    prepare_output_dir(out_dir)
    data = out_dir / "data"
    if not (data / "train" / "good").is_dir():
        reporter.info(f"generating a demo dataset in {data}")
        make_dataset(data, n_train=60, n_test_good=12, n_test_defect_per_type=4, size=160, seed=0)
    lines = [f"demo dataset: {data} (train/good, test/good, test/scratch|dent|stain, ground_truth)"]
    for method in methods:
        run_config = resolve_run_config(
            method=method,
            profile="cpu",
            common_flags={"time_budget_min": DEMO_TIME_BUDGET_MIN, "checkpoint_every_s": 30.0},
        )
        run_dir = out_dir / "runs" / method
        reporter.info((method, "bold"), f": training for about {DEMO_TIME_BUDGET_MIN} minutes")
        result = engine.train(data / "train" / "good", run_config, reporter=reporter, run_dir=run_dir, force=True)
        export_after_training(result.run_dir, reporter)  # as train does: scoring below runs the ONNX export
        model = engine.load(result.run_dir)
        records = out_dir / f"{method}_scores.csv"
        writer = RecordWriter.open(records)
        assert writer is not None
        try:
            summary = engine.score_folder(
                model, data / "test", on_result=lambda r, w=writer: w.write(r.record), reporter=reporter
            )
        finally:
            writer.close()
        heatmaps = out_dir / f"{method}_heatmaps"
        engine.heatmap_folder(model, data / "test", heatmaps, reporter=reporter)
        lines += [
            f"{method}: model {result.run_dir} (scored with {model.runtime})",
            f"  scored {summary.total} test images: {summary.n_good} good, {summary.n_defect} defect "
            f"(the test set has 12 good and 12 defective) -> {records}",
            f"  heatmaps: {heatmaps}/index.html",
            f"  try: surfaceinspect score {data / 'test'} --model {result.run_dir}",
        ]
    return lines
