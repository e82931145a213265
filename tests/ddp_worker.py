"""Run by ``torchrun`` in tests/test_scaleout_ddp.py: data-parallel training on the CPU (gloo).

``ddp_worker.py OUT``, on each rank r:

* its half of a batch of a linear problem through GradientAverager: the gradient to OUT/grad<r>.pt;
* a tiny DRAEM with DistributedDraem: weights to OUT/rank<r>.pt, summary to OUT/summary<r>.json;
* the gathered CS-Flow feature cache (memory and disk) to OUT/cache<r>.pt;
* a tiny CS-Flow with DistributedCSFlow: OUT/csflow<r>.pt, OUT/csflow_summary<r>.json, and once
  more without a feature cache: OUT/csflow_none<r>.pt;
* both methods under a 2-second time budget with a far longer plan, rank 1 told that it has
  already spent 1.5 s (a rank deciding by its own clock would stop earlier): OUT/budget_<method><r>.pt.
"""

import json
import sys
from pathlib import Path

import torch
from ddp_common import linear_problem, tiny_csflow_run, tiny_draem_run, training_images

from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.detectors.csflow.distributed import DistributedCSFlow
from surfaceinspect.detectors.draem.distributed import DistributedDraem
from surfaceinspect.distributed import DistEnv, GradientAverager, process_group

out = Path(sys.argv[1])
env = DistEnv.from_environ()
assert env is not None, "run me with torchrun"
torch.set_num_threads(1)
with process_group(env, torch.device("cpu")):
    model, x, y = linear_problem()
    half = len(x) // env.world_size
    rows = slice(env.rank * half, (env.rank + 1) * half)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step only triggers the hook
    with GradientAverager(model):
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        optimizer.step()
    torch.save([p.grad for p in model.parameters()], out / f"grad{env.rank}.pt")

    detector = DistributedDraem(tiny_draem_run(), torch.device("cpu"))
    summary = detector.fit(training_images(), TrainContext())
    torch.save(detector.state_dict(), out / f"rank{env.rank}.pt")
    (out / f"summary{env.rank}.json").write_text(json.dumps(summary.to_dict()))

    images = training_images(9, 64)
    caches = {}
    for mode in ("memory", "disk"):
        cache_dir = out / f"features{env.rank}"
        cache_dir.mkdir()
        detector = DistributedCSFlow(tiny_csflow_run(mode, str(cache_dir)), torch.device("cpu"))
        detector._join()
        detector._build(pretrained=True)
        store = detector._feature_store(images, 4, None)
        caches[mode] = [torch.as_tensor(a).clone() for a in store.arrays]
        store.close()
        cache_dir.rmdir()  # the disk cache is gone after close
    torch.save(caches, out / f"cache{env.rank}.pt")

    detector = DistributedCSFlow(tiny_csflow_run(), torch.device("cpu"))
    summary = detector.fit(images, TrainContext())
    torch.save(detector.state_dict(), out / f"csflow{env.rank}.pt")
    (out / f"csflow_summary{env.rank}.json").write_text(json.dumps(summary.to_dict()))
    detector = DistributedCSFlow(tiny_csflow_run("none"), torch.device("cpu"))  # no cache: features per batch
    detector.fit(images, TrainContext())
    torch.save(detector.state_dict(), out / f"csflow_none{env.rank}.pt")

    for method, run in (("csflow", tiny_csflow_run()), ("draem", tiny_draem_run(steps=100_000))):
        run.method_config.epochs = 10_000
        detector = (DistributedCSFlow if method == "csflow" else DistributedDraem)(run, torch.device("cpu"))
        data = images if method == "csflow" else training_images()
        context = TrainContext(time_budget_s=2.0, elapsed_before_s=1.5 if env.rank == 1 else 0.0)
        summary = detector.fit(data, context)
        result = {"summary": summary.to_dict(), "state": detector.state_dict()}
        torch.save(result, out / f"budget_{method}{env.rank}.pt")
