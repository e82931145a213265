"""Data-parallel DRAEM training under torchrun (issue #16): 2 CPU processes with gloo.

What is checked: the gradient averaging equals the full-batch gradient; the ranks split every
global batch of DRAEM's sample stream (each synthesises its own anomalies, together exactly the
single-process samples); both ranks end with the same model; and the 2-process training equals
a single process taking the same steps on the same samples with BatchNorm statistics per half
batch. BatchNorm is the one expected difference from a plain single-process run with the whole
batch (SyncBatchNorm needs CUDA), so that is what the single-process reference reproduces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_common import linear_problem, tiny_csflow_run, tiny_draem_run, training_images
from torch.utils.data import default_collate

from surfaceinspect.detectors import available_methods, get_detector_class
from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.detectors.csflow.detector import CSFlowDetector
from surfaceinspect.detectors.csflow.features import FeatureStore
from surfaceinspect.detectors.draem.detector import DraemDetector, lr_at
from surfaceinspect.detectors.draem.losses import DraemLoss
from surfaceinspect.distributed import DistEnv, RankSlice, shard_bounds
from surfaceinspect.storage import modeldir

TESTS_DIR = Path(__file__).resolve().parent
DATA_PARALLEL_METHODS = [m for m in available_methods() if get_detector_class(m).data_parallel is not None]


def test_dist_env_reads_torchrun_variables():
    assert DistEnv.from_environ({}) is None
    env = DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert env == DistEnv(3, 4, 1) and not env.is_main and env.device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("world", "per_rank"), [(2, 2), (3, 4), (4, 1)])
def test_ranks_split_every_global_batch(world, per_rank):
    steps = 7
    seen = []
    for rank in range(world):
        view = RankSlice(list(range(10_000)), per_rank, world, rank)
        for step in range(steps):
            batch = [view[step * per_rank + j] for j in range(per_rank)]
            # rank r's part of global batch `step` lies inside that global batch
            assert all(step * per_rank * world <= i < (step + 1) * per_rank * world for i in batch)
            seen += batch
    assert sorted(seen) == list(range(steps * per_rank * world))  # disjoint, and nothing missing


@pytest.fixture(scope="module")
def torchrun_outputs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*command, str(TESTS_DIR / "ddp_worker.py"), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_gradient_averager_gives_the_full_batch_gradient(torchrun_outputs):
    model, x, y = linear_problem()
    torch.nn.functional.mse_loss(model(x), y).backward()
    for rank in (0, 1):
        grads = torch.load(torchrun_outputs / f"grad{rank}.pt")
        for got, param in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(got, param.grad, rtol=1e-5, atol=1e-6)


def _reference_training(run, images) -> dict[str, torch.Tensor]:
    """One process, the same steps and samples as 2 ranks: each half batch through BatchNorm on its own."""
    detector = DraemDetector(run, torch.device("cpu"))
    cfg, batch = detector.cfg, run.common.batch_size
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    dataset = detector._synthesis_dataset(nhwc, *detector._synthesis_recipe(nhwc), run.common.seed)
    optimizer = torch.optim.Adam(detector.model.parameters(), lr=cfg.lr)
    loss_fn = DraemLoss(cfg.ssim_window, cfg.focal_gamma, cfg.focal_weight)
    detector.model.train()
    half = batch // 2
    for step in range(cfg.steps):
        optimizer.zero_grad()
        for part in range(2):
            samples = default_collate([dataset[step * batch + part * half + j] for j in range(half)])
            rec, logits = detector.model(samples["augmented"])
            loss, _ = loss_fn(rec, samples["image"], logits, samples["mask"])
            (loss / 2).backward()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, tuple(cfg.lr_milestones), cfg.lr_gamma)
        optimizer.step()
    return {name: p.detach() for name, p in detector.model.named_parameters()}


def test_two_process_draem_equals_single_process_on_the_same_samples(torchrun_outputs):
    ranks = [torch.load(torchrun_outputs / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # one model, buffers included
    run = tiny_draem_run()
    reference = _reference_training(run, training_images())
    initial = DraemDetector(tiny_draem_run(), torch.device("cpu")).state_dict()
    for name, value in reference.items():
        assert not torch.equal(value, initial[name])  # it trained
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5)
    summary = json.loads((torchrun_outputs / "summary0.json").read_text())
    assert summary["steps"] == run.method_config.steps and summary["world_size"] == 2
    assert summary["batch_per_rank"] == 2 and summary["epochs"] == round(3 * 4 / 8, 3)


@pytest.mark.parametrize(("n", "world"), [(9, 2), (10, 3), (4, 4), (7, 1)])
def test_feature_shards_cover_the_images_in_order(n, world):
    bounds = [shard_bounds(n, world, rank) for rank in range(world)]
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(n))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_csflow_feature_cache_is_gathered_in_training_image_order(torchrun_outputs):
    images = training_images(9, 64)
    reference = CSFlowDetector(tiny_csflow_run(), torch.device("cpu"))
    reference._build(pretrained=True)
    expected = FeatureStore(reference.extractor, images, "memory", 4, torch.device("cpu")).arrays
    for rank in (0, 1):
        caches = torch.load(torchrun_outputs / f"cache{rank}.pt")
        for mode in ("memory", "disk"):
            for got, want in zip(caches[mode], expected, strict=True):
                # rank 0 extracted images 0-3, rank 1 images 4-8, in other batches than one process
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                # and each row is its own image's: far closer to it than to any other image's features
                distance = torch.cdist(got.flatten(1), want.flatten(1))
                assert torch.equal(distance.argmin(dim=1), torch.arange(9))


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_two_process_csflow_equals_single_process(torchrun_outputs, cache):
    ranks = [torch.load(torchrun_outputs / f"csflow{'' if cache == 'memory' else '_none'}{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # one model
    images = training_images(9, 64)
    reference = CSFlowDetector(tiny_csflow_run(), torch.device("cpu"))
    expected = reference.fit(images, TrainContext())
    untrained = CSFlowDetector(tiny_csflow_run(), torch.device("cpu"))
    untrained.init_random_weights()
    initial = untrained.state_dict()
    for name, value in reference.state_dict().items():
        if name.startswith("flow.") and value.is_floating_point():
            trained = not torch.equal(value, initial[name])
            # 6 Adam steps on batches split 2+2, 2+2, 1+0: only the order of floating-point sums differs
            # (measured: largest difference 7.5e-9 on weights of order 0.1)
            torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=f"{name} (trained: {trained})")
    assert any(not torch.equal(v, initial[k]) for k, v in reference.state_dict().items() if k.startswith("flow."))
    summary = json.loads((torchrun_outputs / "csflow_summary0.json").read_text())
    assert summary["steps"] == expected.steps == 6 and summary["epochs"] == 2 and summary["world_size"] == 2
    assert summary["batch_per_rank"] == 2 and summary["feature_shard"] == 5
    assert summary["final_loss"] == pytest.approx(expected.final_loss, rel=1e-4)  # the whole last batch's loss


@pytest.mark.parametrize("method", DATA_PARALLEL_METHODS)
def test_time_budget_is_decided_by_rank_0_for_all_ranks(torchrun_outputs, method):
    ranks = [torch.load(torchrun_outputs / f"budget_{method}{r}.pt") for r in (0, 1)]
    summaries = [r["summary"] for r in ranks]
    # rank 1's clock ran 1.5 s ahead: on its own it would have stopped earlier (and left rank 0 waiting)
    assert summaries[0]["steps"] == summaries[1]["steps"] < summaries[0]["planned_steps"]
    assert summaries[0]["schedule_note"] and "time budget" in summaries[0]["schedule_note"]
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])


TINY_DRAEM_SETS = [
    "common.image_size=32", "common.batch_size=4", "common.workers=0", "common.time_budget_min=0",
    "common.calibration.min_images=4", "draem.recon_width=8", "draem.disc_width=4", "draem.recon_levels=3",
    "draem.disc_levels=3", "draem.steps=4",
]  # fmt: skip


def _torchrun_train(args: list[str], home: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "surfaceinspect.distributed", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SURFACEINSPECT_HOME": str(home)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("method", DATA_PARALLEL_METHODS)
def test_train_command_under_torchrun_writes_one_model_from_rank_0(synthetic_dataset, tmp_path, method):
    home, out = tmp_path / "home", tmp_path / "run"
    sets = [arg for item in (TINY_DRAEM_SETS if method == "draem" else TINY_CSFLOW_SETS) for arg in ("--set", item)]
    export = [] if method == "draem" else ["--no-export"]  # the export after torchrun training: checked once
    result = _torchrun_train(
        ["-m", method, "--profile", "cpu", str(synthetic_dataset / "train" / "good"), "--out", str(out),
         "--threads", "1", *export, *sets],
        home,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"model.safetensors", "calibration.json", "metadata.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoint.pt").exists()
    training = json.loads((out / "metadata.json").read_text())["training"]
    steps = 4 if method == "draem" else 2 * -(-training["n_train_images"] // 4)
    assert training["world_size"] == 2 and training["batch_per_rank"] == 2 and training["steps"] == steps
    assert [p.name for p in (home / "runs").iterdir() if p.is_dir()] == []  # no scratch run of rank 1 left
    assert result.stdout.count("done in") + result.stderr.count("done in") == 1  # rank 0 reports, once
    if not export:  # rank 0 alone exports, after the other rank has left
        assert (out / "export-onnx" / "export.json").is_file() and result.stderr.count("exported") == 1
        assert modeldir.verify_sums(out, expected=True).sealed
    # the model is an ordinary run: score loads it
    from typer.testing import CliRunner

    from surfaceinspect.cli import app

    scored = CliRunner().invoke(app, ["score", str(synthetic_dataset / "test"), "--model", str(out), "-q"])
    assert scored.exit_code in (0, 1), scored.output


def test_bare_runs_are_refused_with_one_line():
    bare = subprocess.run([sys.executable, "-m", "surfaceinspect.distributed", "train"], capture_output=True, text=True)
    assert bare.returncode == 2 and "torchrun --nproc-per-node N" in bare.stderr


def interrupt_at_step(monkeypatch, detector_cls, step: int) -> None:
    """Ctrl-C (KeyboardInterrupt) at training step ``step`` of ``detector_cls`` in this process."""
    original, calls = detector_cls._train_step, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(detector_cls, "_train_step", interrupted)


@pytest.mark.slow
def test_torchrun_resumes_an_interrupted_run(synthetic_dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from surfaceinspect.cli import app

    home, out = tmp_path / "home", tmp_path / "run"
    monkeypatch.setenv("SURFACEINSPECT_HOME", str(home))
    interrupt_at_step(monkeypatch, DraemDetector, 3)
    sets = [arg for item in [*TINY_DRAEM_SETS, "common.checkpoint_every_s=0.001"] for arg in ("--set", item)]
    args = ["train", "-m", "draem", "--profile", "cpu", str(synthetic_dataset / "train" / "good"), "--out", str(out)]
    first = CliRunner().invoke(app, [*args, "--threads", "1", "-q", *sets])
    assert first.exit_code == 130 and (out / "checkpoint.pt").is_file(), first.output
    result = _torchrun_train(["--resume", str(out), "--no-export"], home)
    assert result.returncode == 0, result.stderr[-3000:]
    training = json.loads((out / "metadata.json").read_text())["training"]
    assert training["resumed_from_step"] == 2 and training["steps"] == 4 and training["world_size"] == 2
    assert (out / "calibration.json").is_file() and not (out / "checkpoint.pt").exists()


TINY_CSFLOW_SETS = [
    "common.image_size=64", "common.batch_size=4", "common.workers=0", "common.time_budget_min=0",
    "common.calibration.min_images=4", "common.checkpoint_every_s=0.001", "csflow.feature_stage=3",
    "csflow.hidden_channels=16", "csflow.n_blocks=2", "csflow.kernel_sizes=[3,5]", "csflow.epochs=2",
    "csflow.feature_norm=channel", "csflow.lr=0.001",
]  # fmt: skip


@pytest.mark.slow
def test_csflow_interrupted_in_one_process_resumes_under_torchrun(synthetic_dataset, tmp_path, monkeypatch):
    """Train, interrupt mid-epoch 2, resume with 2 processes: the model of one uninterrupted process."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from surfaceinspect.cli import app

    home = tmp_path / "home"
    monkeypatch.setenv("SURFACEINSPECT_HOME", str(home))
    sets = [arg for item in TINY_CSFLOW_SETS for arg in ("--set", item)]
    good = str(synthetic_dataset / "train" / "good")
    args = ["train", "-m", "csflow", "--profile", "cpu", good, "--threads", "1", "-q", "--no-export", *sets]
    whole = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output

    interrupt_at_step(monkeypatch, CSFlowDetector, 8)
    out = tmp_path / "run"
    first = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert first.exit_code == 130 and (out / "checkpoint.pt").is_file(), first.output
    result = _torchrun_train(["--resume", str(out), "--no-export"], home)
    assert result.returncode == 0, result.stderr[-3000:]

    training = json.loads((out / "metadata.json").read_text())["training"]
    steps = json.loads((tmp_path / "whole" / "metadata.json").read_text())["training"]["steps"]
    assert steps == 2 * -(-training["n_train_images"] // 4)  # 2 epochs of batches of 4
    assert training["resumed_from_step"] == 7 and training["steps"] == steps and training["world_size"] == 2
    assert (out / "calibration.json").is_file() and not (out / "checkpoint.pt").exists()
    assert [p.name for p in (home / "runs").iterdir() if p.is_dir()] == []  # no scratch run of rank 1 left
    resumed, expected = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=1e-5, msg=name)
