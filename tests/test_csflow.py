"""Tests of the CS-Flow detector: flow maths, config checks, backbones, training, persistence."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from surfaceinspect.config import CommonConfig, RunConfig
from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.detectors.csflow import CSFlowConfig, CSFlowDetector, backbones as bb
from surfaceinspect.detectors.csflow.detector import image_scores
from surfaceinspect.detectors.csflow.flow import CSFlow, nll_per_dim, soft_clamp
from surfaceinspect.errors import BackboneWeightsError, ConfigError, TrainingError

# A tiny but real configuration: EfficientNet-Lite0 stage 3 (40 channels, stride 8) keeps every test fast.
TINY = {"feature_stage": 3, "hidden_channels": 24, "n_blocks": 2, "kernel_sizes": (3, 5), "map_sigma": 1.0}


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite shares the cores with other work
    yield
    torch.set_num_threads(old)


def make_detector(size: int | list[int] = 64, batch_size: int = 8, **overrides) -> CSFlowDetector:
    cfg = CSFlowConfig(**{**TINY, "epochs": 2, **overrides})
    common = CommonConfig(image_size=size, batch_size=batch_size, seed=0)
    cfg.validate(common)
    return CSFlowDetector(RunConfig("csflow", "test", common, cfg), torch.device("cpu"))


def tiny_flow(seed: int = 0) -> CSFlow:
    flow = CSFlow(channels=5, n_blocks=2, hidden_channels=6, kernel_sizes=(3, 5), clamp=3.0, n_scales=3, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            # Non-zero gains (initialised at 0 = identity flow) so the test exercises real couplings.
            scale = 1.0 if name.endswith("gamma") else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return flow.double()


def tiny_features(batch: int = 2, channels: int = 5, size: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, channels, size >> i, size >> i, generator=gen, dtype=torch.float64) for i in range(3)]


def texture_images(n: int, size: int, defect: bool, seed: int) -> torch.Tensor:
    """Vertical stripes with noise; a defect is a square patch of horizontal stripes (same contrast)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(n):
        phase = torch.rand(1, generator=gen) * 2 * math.pi
        img = 0.5 + 0.25 * torch.sin(xx * 2 * math.pi / 8 + phase)
        if defect:
            cy, cx = torch.randint(size // 5, size - size // 5, (2,), generator=gen).tolist()
            r = size // 8
            patch = ((yy - cy).abs() < r) & ((xx - cx).abs() < r)
            img = torch.where(patch, 0.5 + 0.25 * torch.sin(yy * 2 * math.pi / 8 + phase), img)
        img = img + 0.05 * torch.randn(size, size, generator=gen)
        rgb = torch.stack([img, img * 0.9, img * 0.8]).clamp(0, 1)
        out.append((rgb * 255).round().to(torch.uint8))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- flow


def test_flow_is_invertible():
    flow = tiny_flow()
    x = tiny_features()
    with torch.no_grad():
        z, _ = flow(x)
        back = flow.inverse(z)
    assert max((a - b).abs().max().item() for a, b in zip(x, back, strict=True)) < 1e-7
    assert max((a - b).abs().max().item() for a, b in zip(x, z, strict=True)) > 1e-2  # not the identity


def test_logdet_matches_bruteforce_jacobian():
    flow = tiny_flow(seed=3)
    x = tiny_features(batch=1)
    shapes = [t.shape for t in x]
    sizes = [t.numel() for t in x]

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = [p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes, strict=True)]
        z, _ = flow(parts)
        return torch.cat([t.reshape(-1) for t in z])

    flat = torch.cat([t.reshape(-1) for t in x])
    jac = torch.autograd.functional.jacobian(f, flat)
    _sign, brute = torch.linalg.slogdet(jac)
    with torch.no_grad():
        _, logdet = flow(x)
    assert jac.shape == (flat.numel(), flat.numel())
    assert abs(brute.item() - logdet.item()) < 1e-6 * max(1.0, abs(brute.item()))
    assert abs(logdet.item()) > 1e-2


def test_flow_starts_as_identity_and_nll_matches_gaussian():
    flow = CSFlow(channels=6, n_blocks=2, hidden_channels=8, kernel_sizes=(3, 3)).double()
    x = tiny_features(channels=6)
    z, logdet = flow(x)
    # Gains start at 0: every coupling is the identity, only the permutations move channels.
    assert torch.allclose(logdet, torch.zeros_like(logdet))
    assert sorted(a.pow(2).sum().item() for a in x) == pytest.approx(sorted(b.pow(2).sum().item() for b in z))
    flat = torch.cat([t.flatten(1) for t in x], 1)
    assert nll_per_dim(z, logdet).item() == pytest.approx((0.5 * flat.pow(2).sum(1)).mean().item() / flat.shape[1])


def test_soft_clamp_bounds():
    s = torch.linspace(-1e4, 1e4, 20001, dtype=torch.float64)
    for clamp in (0.5, 3.0, 10.0):
        out = soft_clamp(s, clamp)
        assert out.abs().max().item() < clamp * 0.636 * math.pi / 2 + 1e-12
        assert out.abs().max().item() > 0.99 * clamp * 0.636 * math.pi / 2  # the bound is approached
        assert torch.all(out[1:] >= out[:-1])  # monotonic, so the coupling stays invertible
    small = torch.tensor([1e-4], dtype=torch.float64)
    assert soft_clamp(small, 3.0).item() == pytest.approx(0.636e-4, rel=1e-6)
    assert torch.equal(soft_clamp(s, 0.0), s)  # clamp 0 disables clamping


def test_permutations_stored_as_buffers_and_differ_per_block():
    flow = CSFlow(channels=16, n_blocks=4, hidden_channels=4, kernel_sizes=(3, 3, 3, 5))
    perms = [p.perm for p in flow.permutations]
    assert all(torch.equal(torch.sort(p, dim=1).values[0], torch.arange(16)) for p in perms)
    assert not torch.equal(perms[0], perms[1])
    assert "permutations.0.perm" in flow.state_dict()


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("size", [250, 96, 320])
def test_invalid_sizes_rejected_with_valid_choices(size):
    cfg = CSFlowConfig()  # lite0 stage 6: stride 32, 3 scales -> multiple of 128
    with pytest.raises(ConfigError) as err:
        cfg.validate(CommonConfig(image_size=size))
    msg = str(err.value)
    assert "multiple of 128" in msg and f"image_size={size}" in msg and "256" in msg
    assert "\n" not in msg


def test_valid_sizes_accepted_and_depend_on_stage():
    CSFlowConfig().validate(CommonConfig(image_size=256))
    CSFlowConfig(feature_stage=5).validate(CommonConfig(image_size=320))  # stride 16 -> multiple of 64
    with pytest.raises(ConfigError, match="multiple of 64"):
        CSFlowConfig(feature_stage=5).validate(CommonConfig(image_size=288))


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError) as err:
        CSFlowConfig(backbone="resnet18").validate(CommonConfig(image_size=256))
    for name in ("efficientnet_b5", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert name in str(err.value)


def test_other_bad_settings_rejected():
    common = CommonConfig(image_size=256)
    for bad in (
        {"kernel_sizes": (3, 3, 3)},
        {"kernel_sizes": (3, 3, 3, 4)},
        {"map_mode": "max"},
        {"feature_cache": "gpu"},
        {"clamp": -1.0},
        {"feature_stage": 9},
        {"score_mode": "median"},
        {"score_topk": 0.0},
        {"score_topk": 1.5},
    ):
        with pytest.raises(ConfigError):
            CSFlowConfig(**bad).validate(common)


def test_invalid_size_rejected_by_build_run_config():
    """The path the CLI uses validates the size before any model is built."""
    from surfaceinspect.config import build_run_config

    with pytest.raises(ConfigError, match="multiple of 128"):
        build_run_config(CSFlowConfig, "cpu", [{"common": {"image_size": 200}}])
    run = build_run_config(CSFlowConfig, "paper", [{"common": {"image_size": 256}}])
    assert run.method_config.backbone == "efficientnet_b5" and run.method_config.hidden_channels == 1024


# ---------------------------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_weights_load_without_missing_keys(name):
    width, depth = bb._LITE_MULTIPLIERS[name]
    model = bb.EfficientNetLite(width, depth)
    state = torch.load(bb.lite_weights_path(name), map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in model.state_dict().items():
        assert value.shape == state[key].shape, key
    # The stage table used for size checks matches the real network.
    trunk = bb.build_trunk(name, 6, None)
    with torch.no_grad():
        out = trunk(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, bb.BACKBONES[name].channels(6), 2, 2)


def test_lite0_classifies_a_real_photo():
    datasets = pytest.importorskip("sklearn.datasets")
    from torchvision.models import EfficientNet_B5_Weights

    categories = EfficientNet_B5_Weights.IMAGENET1K_V1.meta["categories"]
    img = torch.from_numpy(np.array(datasets.load_sample_image("china.jpg"))).permute(2, 0, 1).float() / 255
    h, w = img.shape[-2:]
    s = min(h, w)
    img = img[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    x = F.interpolate(img[None], size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    model = bb.build_lite("efficientnet_lite0").eval()
    with torch.no_grad():
        probs = model((x - 0.5) / 0.5).softmax(-1)[0]
    top5 = [categories[i] for i in probs.topk(5).indices]
    assert "palace" in top5  # the Summer Palace; random or mis-loaded weights give unrelated classes
    assert probs.max().item() > 0.2


def test_missing_b5_weights_gives_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    det = make_detector(size=128, backbone="efficientnet_b5", feature_stage=6, n_blocks=1, kernel_sizes=(3,))
    with pytest.raises(BackboneWeightsError) as err:
        det.fit(texture_images(2, 128, False, 0), TrainContext())
    msg = str(err.value)
    expected = tmp_path / "hub" / "checkpoints" / "efficientnet_b5_lukemelas-1a07897c.pth"
    assert str(expected) in msg and "efficientnet_lite0" in msg and "--backbone-weights" in msg
    assert "\n" not in msg
    assert det.flow is None  # nothing was built


def test_missing_explicit_weights_file(tmp_path):
    det = make_detector(backbone_weights=str(tmp_path / "nope.pth"))
    with pytest.raises(BackboneWeightsError, match=r"nope\.pth"):
        det.fit(texture_images(2, 64, False, 0), TrainContext())


# ---------------------------------------------------------------------------------------------- training


def test_feature_cache_modes_give_identical_training(tmp_path):
    images = texture_images(12, 64, False, seed=5)
    probe = texture_images(3, 64, True, seed=6).float() / 255
    results = {}
    for mode in ("memory", "disk", "none"):
        det = make_detector(feature_cache=mode, cache_dir=str(tmp_path))
        det.fit(images, TrainContext())
        results[mode] = det.predict(probe)
    assert list(tmp_path.iterdir()) == []  # the disk cache is removed after training
    for mode in ("disk", "none"):
        assert torch.allclose(results[mode].scores, results["memory"].scores, rtol=1e-5, atol=1e-6)
        assert torch.allclose(results[mode].maps, results["memory"].maps, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_short_training_separates_good_from_defective():
    size = 96
    train = texture_images(32, size, False, seed=1)
    good = texture_images(12, size, False, seed=2).float() / 255
    bad = texture_images(12, size, True, seed=3).float() / 255
    labels = [0] * len(good) + [1] * len(bad)

    untrained = make_detector(size=size, hidden_channels=32)
    untrained._build(pretrained=True)  # gains at 0: the identity flow, scores = raw feature energy
    base = untrained.predict(torch.cat([good, bad])).scores
    base_auroc = roc_auc_score(labels, base.numpy())

    det = make_detector(size=size, epochs=16, hidden_channels=32)
    progress = []
    summary = det.fit(train, TrainContext(on_progress=progress.append))
    assert summary.epochs == 16 and math.isfinite(summary.final_loss)
    assert {p.phase for p in progress} == {"features", "train"}
    losses = [p.loss for p in progress if p.phase == "train" and p.loss is not None]  # none before step 1
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    pg, pb = det.predict(good), det.predict(bad)
    auroc = roc_auc_score(labels, torch.cat([pg.scores, pb.scores]).numpy())
    assert auroc >= 0.95 and auroc > base_auroc, (auroc, base_auroc)
    assert pb.maps.shape == (len(bad), size, size) and pb.maps.dtype == torch.float32
    # The map is in the units of the score: its mean over pixels is of the same order.
    ratio = (pg.maps.mean(dim=(1, 2)) / pg.scores).mean().item()
    assert 0.2 < ratio < 5.0


def test_product_map_mode():
    det = make_detector(map_mode="product", epochs=1)
    det.fit(texture_images(8, 64, False, seed=1), TrainContext())
    pred = det.predict(texture_images(2, 64, True, seed=2).float() / 255)
    assert pred.maps.shape == (2, 64, 64) and torch.isfinite(pred.maps).all() and (pred.maps > 0).all()


def test_score_modes_on_a_synthetic_map():
    # Two images with the same total energy: one spread evenly, one in a single hot spot of 1 % of the map.
    energy_even = torch.full((1, 4, 10, 10), 1.0)
    energy_spot = torch.zeros((1, 4, 10, 10))
    energy_spot[0, :, 3, 7] = 100.0
    energy = [torch.cat([energy_even, energy_spot])]
    maps = energy[0].mean(dim=1)
    mean = image_scores(energy, maps, "mean", 0.01)
    assert torch.allclose(mean, torch.tensor([1.0, 1.0]))  # the paper's mean cannot tell them apart
    assert torch.allclose(image_scores(energy, maps, "max", 0.01), torch.tensor([1.0, 100.0]))
    assert torch.allclose(image_scores(energy, maps, "topk", 0.01), torch.tensor([1.0, 100.0]))  # k = 1 pixel
    assert torch.allclose(image_scores(energy, maps, "topk", 0.02), torch.tensor([1.0, 50.0]))  # k = 2
    assert torch.allclose(image_scores(energy, maps, "topk", 1e-6), torch.tensor([1.0, 100.0]))  # k >= 1
    assert torch.allclose(image_scores(energy, maps, "topk", 1.0), maps.mean(dim=(1, 2)))
    # mean: over every position, channel and scale (a scale of a quarter the positions counts a quarter)
    two_scales = [torch.ones(1, 4, 10, 10), torch.full((1, 4, 5, 5), 5.0)]
    assert torch.allclose(image_scores(two_scales, maps[:1], "mean", 0.01), torch.tensor([(100 + 25 * 5) / 125]))


def test_score_mode_is_an_inference_setting():
    assert {"score_mode", "score_topk"} <= CSFlowConfig.inference_keys
    det = make_detector(epochs=1)
    det.fit(texture_images(8, 64, False, seed=1), TrainContext())
    images = texture_images(3, 64, True, seed=2).float() / 255
    paper = det.predict(images)
    det.config.score_mode = "max"
    peak = det.predict(images)
    det.config.score_mode, det.config.score_topk = "topk", 0.05
    top = det.predict(images)
    assert torch.equal(paper.maps, peak.maps) and torch.equal(paper.maps, top.maps)  # only the score changes
    assert torch.allclose(peak.scores, paper.maps.flatten(1).amax(dim=1))
    k = round(0.05 * 64 * 64)
    assert torch.allclose(top.scores, paper.maps.flatten(1).topk(k, dim=1).values.mean(dim=1))
    assert (top.scores <= peak.scores).all() and not torch.allclose(paper.scores, peak.scores)


def test_save_load_through_safetensors_gives_identical_scores(tmp_path):
    det = make_detector(epochs=1)
    det.fit(texture_images(8, 64, False, seed=1), TrainContext())
    probe = texture_images(3, 64, True, seed=2).float() / 255
    before = det.predict(probe)
    save_file(det.state_dict(), tmp_path / "model.safetensors")
    fresh = make_detector(epochs=1)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    after = fresh.predict(probe)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


def test_feature_norm_standardises_and_round_trips(tmp_path):
    images = texture_images(10, 64, False, seed=1)
    det = make_detector(feature_norm="channel", epochs=1)
    det.fit(images, TrainContext())
    assert det.norm is not None and len(det.norm) == 3
    with torch.inference_mode():
        feats = det._layout(det.extractor(images.float() / 255))
    for f in feats:  # the training features, standardised per channel
        assert f.mean(dim=(0, 2, 3)).abs().max().item() < 1e-3
        live = f.std(dim=(0, 2, 3)) > 1e-3
        assert torch.allclose(f.std(dim=(0, 2, 3), unbiased=False)[live], torch.ones(int(live.sum())), atol=1e-3)
    probe = texture_images(2, 64, True, seed=2).float() / 255
    save_file(det.state_dict(), tmp_path / "m.safetensors")
    fresh = make_detector(feature_norm="channel", epochs=1)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert torch.equal(det.predict(probe).scores, fresh.predict(probe).scores)


def test_feature_norm_whiten_decorrelates_round_trips_and_exports(tmp_path):
    images = texture_images(10, 64, False, seed=1)
    det = make_detector(feature_norm="whiten", whiten_shrinkage=0.01, epochs=1)
    det.fit(images, TrainContext())
    assert det.norm is not None and len(det.norm) == 3
    with torch.inference_mode():
        raw = det.extractor(images.float() / 255)
        feats = det._layout(raw)
    for r, f in zip(raw, feats, strict=True):
        # Whitened training features: centred, covariance W S W = S (S + rI)^-1 (I where S has full
        # rank and r -> 0; the tiny test set has fewer positions than channels, so check the identity).
        def cov_of(t: torch.Tensor) -> torch.Tensor:
            rows = t.double().permute(0, 2, 3, 1).reshape(-1, t.shape[1])
            return torch.cov(rows.T, correction=0), rows.mean(0)

        white, mean = cov_of(f)
        source, _ = cov_of(r)
        assert mean.abs().max().item() < 1e-3
        ridge = 0.01 * source.diagonal().mean()
        expected = source @ torch.linalg.inv(source + ridge * torch.eye(len(source), dtype=source.dtype))
        assert torch.allclose(white, expected, atol=2e-3), (white - expected).abs().max()
    probe = texture_images(2, 64, True, seed=2).float() / 255
    save_file(det.state_dict(), tmp_path / "m.safetensors")
    assert "norm.whiten.0" in load_file(tmp_path / "m.safetensors")
    fresh = make_detector(feature_norm="whiten", epochs=1)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    expected = det.predict(probe)
    assert torch.equal(expected.scores, fresh.predict(probe).scores)
    with torch.inference_mode():  # the exported module applies the same whitening
        scores, maps = det.inference_module()(probe)
    assert torch.allclose(scores, expected.scores, rtol=1e-4, atol=1e-5)
    assert torch.allclose(maps, expected.maps, rtol=1e-4, atol=1e-5)


def test_whitened_identity_flow_is_the_gaussian_mahalanobis_distance():
    """Before training (identity couplings) z^2 summed over channels is the shrunk Mahalanobis distance."""
    images = texture_images(8, 64, False, seed=3)
    det = make_detector(feature_norm="whiten", whiten_shrinkage=0.05, epochs=1, n_scales=1)
    det._build(pretrained=True)
    store = det._feature_store(images, 8, None)
    det.norm = det._feature_statistics(store, len(images), 8)
    raw = det.extractor(texture_images(2, 64, True, seed=4).float() / 255)[0].double()
    train = det.extractor(images.float() / 255)[0].double().permute(0, 2, 3, 1).reshape(-1, raw.shape[1])
    cov = torch.cov(train.T, correction=0)
    cov += 0.05 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    diff = raw.permute(0, 2, 3, 1) - train.mean(0)
    mahalanobis = torch.einsum("bhwc,cd,bhwd->bhw", diff, torch.linalg.inv(cov), diff)
    with torch.inference_mode():
        zs, _ = det.flow(det._layout([raw.float()]))
    assert torch.allclose(zs[0].double().pow(2).sum(1), mahalanobis, rtol=1e-3, atol=1e-3)


def test_whiten_shrinkage_must_be_positive():
    with pytest.raises(ConfigError, match="whiten_shrinkage"):
        make_detector(feature_norm="whiten", whiten_shrinkage=0.0)


def test_non_finite_features_raise_training_error(monkeypatch):
    det = make_detector()
    real_forward = bb.MultiScaleFeatures.forward

    def poisoned(self, images):
        feats = real_forward(self, images)
        feats[1][0, 0, 0, 0] = float("nan")
        return feats

    monkeypatch.setattr(bb.MultiScaleFeatures, "forward", poisoned)
    with pytest.raises(TrainingError, match="not finite"):
        det.fit(texture_images(4, 64, False, seed=1), TrainContext())


def test_non_finite_loss_raises_training_error(monkeypatch):
    from surfaceinspect.detectors.csflow import detector as det_module

    monkeypatch.setattr(det_module, "nll_per_dim", lambda zs, logdet: torch.tensor(float("nan"), requires_grad=True))
    det = make_detector()
    with pytest.raises(TrainingError, match=r"lower csflow\.lr"):
        det.fit(texture_images(4, 64, False, seed=1), TrainContext())


def test_checkpoint_resume_matches_uninterrupted_run():
    images = texture_images(12, 64, False, seed=4)
    probe = texture_images(2, 64, True, seed=7).float() / 255

    full = make_detector(epochs=3, batch_size=4)
    full.fit(images, TrainContext())

    class Stop(Exception):
        pass

    saved = []

    def on_checkpoint(state):
        buf = io.BytesIO()
        torch.save(state, buf)  # checkpoints must load with weights_only=True
        buf.seek(0)
        saved.append(torch.load(buf, weights_only=True))
        if len(saved) == 4:  # mid-way through epoch 2
            raise Stop

    first = make_detector(epochs=3, batch_size=4)
    with pytest.raises(Stop):
        first.fit(images, TrainContext(on_checkpoint=on_checkpoint, checkpoint_every_s=1e-9))
    resumed = make_detector(epochs=3, batch_size=4)
    summary = resumed.fit(images, TrainContext(resume_state=saved[-1]))
    assert summary.steps == full_steps(12, 4, 3)
    a, b = full.predict(probe), resumed.predict(probe)
    assert torch.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def full_steps(n: int, bs: int, epochs: int) -> int:
    return math.ceil(n / bs) * epochs


def test_time_budget_shortens_training():
    det = make_detector(epochs=1000)
    summary = det.fit(texture_images(8, 64, False, seed=1), TrainContext(time_budget_s=3.0))
    assert 1 <= summary.epochs < 1000
    assert summary.seconds < 30  # budget 3 s plus at most one epoch overshoot (slack for busy CPUs)


@pytest.mark.realdata
def test_real_mtd_images_train_when_present(real_dataset):
    root = real_dataset("mtd")
    import cv2

    paths = sorted((root / "train" / "good").glob("*.jpg"))[:8]
    imgs = []
    for p in paths:
        im = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        imgs.append(torch.from_numpy(cv2.resize(im, (64, 64), interpolation=cv2.INTER_AREA)).permute(2, 0, 1))
    det = make_detector(epochs=1)
    summary = det.fit(torch.stack(imgs), TrainContext())
    assert math.isfinite(summary.final_loss)
