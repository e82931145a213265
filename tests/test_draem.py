"""DRAEM: synthesis, losses, networks, training/resume, persistence, config checks (generated data only)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from surfaceinspect.config import CommonConfig, RunConfig, build_run_config
from surfaceinspect.detectors import get_detector_class
from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.detectors.draem import DraemConfig, DraemDetector
from surfaceinspect.detectors.draem.losses import focal_loss, ssim
from surfaceinspect.detectors.draem.networks import DraemModel, fuse_conv_bn, init_weights
from surfaceinspect.detectors.draem.perlin import perlin_mask, perlin_noise
from surfaceinspect.detectors.draem.sources import make_source
from surfaceinspect.detectors.draem.synthesis import SynthesisDataset, SynthesisParams, blend, synthesize
from surfaceinspect.errors import ConfigError


def tiny_run(size: int | list[int] = 32, **draem: object) -> RunConfig:
    """A small, fast configuration (3 levels each -> sizes must be multiples of 4).

    One thread: tiny convs gain nothing from more, and on a busy machine OpenMP barriers across
    threads that get descheduled made training steps ~6x slower.
    """
    fields = {"recon_width": 8, "disc_width": 4, "recon_levels": 3, "disc_levels": 3, "smoothing_kernel": 5}
    fields.update(draem)
    run = RunConfig(
        "draem",
        "test",
        CommonConfig(image_size=size, batch_size=4, workers=0, seed=3, threads=1),
        DraemConfig(**fields),
    )
    run.validate()
    return run


def random_uint8(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# synthesis


@pytest.mark.parametrize("size", [37, 100, 130, 200])
def test_perlin_masks_binary_and_nontrivial_for_any_size(size: int) -> None:
    rng = np.random.default_rng(size)
    fractions = []
    corner_hits = 0
    for _ in range(40):
        m = perlin_mask(size, rng, (0, 5), 0.5)
        assert m.shape == (size, size) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0}
        fractions.append(m.mean())
        corner_hits += int(m[0, 0] + m[-1, -1] + m[0, -1] + m[-1, 0] > 0)
    fractions = np.array(fractions)
    # Most masks are partial (neither empty nor full) and the typical one covers a modest area.
    assert ((fractions > 0) & (fractions < 1)).mean() > 0.6
    assert 0.01 < np.median(fractions) < 0.5
    # Noise is evaluated at rotated coordinates, so corners are not systematically empty.
    assert corner_hits > 0


def test_perlin_noise_is_continuous_and_bounded() -> None:
    n = perlin_noise((90, 70), (2.0, 3.0), np.random.default_rng(0), angle_deg=33.0)
    assert n.shape == (90, 70)
    assert np.abs(n).max() <= 1.5
    # Neighbouring pixels differ little at this low frequency (no seams at cell borders).
    assert np.abs(np.diff(n, axis=0)).max() < 0.2 and np.abs(np.diff(n, axis=1)).max() < 0.2


def test_blend_keeps_unmasked_pixels_and_uses_opacity() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((40, 50, 3)).astype(np.float32)
    texture = rng.random((40, 50, 3)).astype(np.float32)
    mask = (rng.random((40, 50)) > 0.7).astype(np.float32)
    out = blend(image, texture, mask, beta=0.4)
    off = mask == 0
    assert np.array_equal(out[off], image[off])
    on = mask == 1
    np.testing.assert_allclose(out[on], 0.6 * image[on] + 0.4 * texture[on], atol=1e-6)
    np.testing.assert_allclose(blend(image, texture, mask, 1.0)[on], texture[on], atol=1e-6)


def test_synthesize_normal_and_anomalous_samples() -> None:
    image = np.full((48, 48, 3), 0.5, np.float32)
    src = make_source("fractal")
    out, mask = synthesize(image, src, SynthesisParams(anomaly_prob=0.0), np.random.default_rng(0))
    assert np.array_equal(out, image) and not mask.any()
    changed = 0
    for seed in range(10):
        out, mask = synthesize(image, src, SynthesisParams(anomaly_prob=1.0), np.random.default_rng(seed))
        assert np.array_equal(out[mask == 0], image[mask == 0])
        changed += int(mask.any() and not np.allclose(out[mask == 1], 0.5))
    assert changed >= 5


def test_grayscale_textures_stay_grey() -> None:
    image = np.full((32, 32, 3), 0.5, np.float32)
    params = SynthesisParams(anomaly_prob=1.0, grayscale=True, opacity_range=(1.0, 1.0))
    for seed in range(5):
        out, _ = synthesize(image, make_source("structured"), params, np.random.default_rng(seed))
        assert np.allclose(out[..., 0], out[..., 1]) and np.allclose(out[..., 1], out[..., 2])


@pytest.mark.parametrize("name", ["fractal", "structured", "self", "builtin"])
def test_builtin_sources_give_valid_textures(name: str) -> None:
    imgs = random_uint8(3, 40).permute(0, 2, 3, 1).numpy()
    src = make_source(name, imgs)
    tex = src.sample(np.random.default_rng(1), 50)
    assert tex.shape == (50, 50, 3) and tex.dtype == np.float32
    assert tex.min() >= 0.0 and tex.max() <= 1.0 and tex.std() > 0.01


def test_folder_source_reads_images(tmp_path) -> None:
    import cv2

    (tmp_path / "sub").mkdir()
    cv2.imwrite(str(tmp_path / "sub" / "a.png"), np.full((20, 30, 3), (0, 0, 255), np.uint8))  # BGR red
    tex = make_source(str(tmp_path)).sample(np.random.default_rng(0), 16)
    assert tex.shape == (16, 16, 3)
    assert tex[..., 0].mean() > 0.99 and tex[..., 2].mean() < 0.01  # returned as RGB


def test_dataset_samples_are_reproducible_from_seed_and_index() -> None:
    imgs = random_uint8(5, 32).permute(0, 2, 3, 1).numpy()
    params = SynthesisParams(anomaly_prob=1.0)
    a = SynthesisDataset(imgs, make_source("fractal"), params, seed=7)
    b = SynthesisDataset(imgs, make_source("fractal"), params, seed=7)
    for g in (0, 3, 11, 1234):
        sa, sb = a[g], b[g]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a[1]["augmented"], a[2]["augmented"])
    # Every image is used once per epoch.
    used = {
        int(np.argmin([np.abs(imgs[i] / 255.0 - a[g]["image"].permute(1, 2, 0).numpy()).sum() for i in range(5)]))
        for g in range(5)
    }
    assert used == set(range(5))


# --------------------------------------------------------------------------------------------
# losses


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """skimage-style SSIM (gaussian_weights, sigma 1.5, 11x11 window), valid region, float64."""

    def filt(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, sigma=1.5, truncate=3.5)  # radius 5 -> 11x11 window

    c1, c2 = 0.01**2, 0.03**2
    ma, mb = filt(a), filt(b)
    va, vb, cov = filt(a * a) - ma * ma, filt(b * b) - mb * mb, filt(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(s[5:-5, 5:-5].mean())


def test_ssim_matches_reference() -> None:
    rng = np.random.default_rng(0)
    a = gaussian_filter(rng.random((48, 40)), 2.0)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ours = float(ssim(torch.tensor(a)[None, None].float(), torch.tensor(b)[None, None].float(), 11))
    assert ours == pytest.approx(_ssim_reference(a, b), abs=2e-4)
    x = torch.rand(2, 3, 30, 30)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    # Two constant images: SSIM = (2*mu_a*mu_b + c1) / (mu_a^2 + mu_b^2 + c1) by hand.
    c1 = 1e-4
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    const = float(ssim(torch.full((1, 1, 20, 20), 0.2), torch.full((1, 1, 20, 20), 0.6)))
    assert const == pytest.approx(expected, abs=3e-4)  # float32 E[x^2] - mu^2 cancellation


def test_focal_loss_on_hand_made_inputs() -> None:
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1] = math.log(3.0)  # p(anomaly) = 0.75 at both pixels
    target = torch.tensor([[[[1.0, 0.0]]]])
    expected = (-(0.25**2) * math.log(0.75) - (0.75**2) * math.log(0.25)) / 2
    assert float(focal_loss(logits, target, gamma=2.0)) == pytest.approx(expected, rel=1e-5)
    # gamma = 0 is plain cross-entropy.
    rnd = torch.randn(2, 2, 5, 5)
    tgt = (torch.rand(2, 1, 5, 5) > 0.5).float()
    ce = F.cross_entropy(rnd, tgt[:, 0].long())
    assert float(focal_loss(rnd, tgt, gamma=0.0)) == pytest.approx(float(ce), rel=1e-5)


# --------------------------------------------------------------------------------------------
# networks and config


def test_paper_network_sizes_and_init() -> None:
    model = DraemModel(128, 64)
    n_rec = sum(p.numel() for p in model.recon.parameters())
    n_dis = sum(p.numel() for p in model.disc.parameters())
    # The authors' networks have about 69 M and 28 M parameters.
    assert 65e6 < n_rec < 72e6 and 26e6 < n_dis < 30e6
    small = DraemModel(8, 4, 4, 4)
    init_weights(small)
    w = torch.cat([m.weight.flatten() for m in small.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(float(w.detach().std()) - 0.02) < 0.003
    rec, logits = small(torch.rand(2, 3, 40, 40))
    assert rec.shape == (2, 3, 40, 40) and logits.shape == (2, 2, 40, 40)


def test_bn_fusion_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = DraemModel(8, 4, 3, 3)
    model.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        model(torch.rand(4, 3, 24, 24))
    model.eval()
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        ref = model(x)[1]
        fused = fuse_conv_bn(__import__("copy").deepcopy(model))(x)[1]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fuse_conv_bn(model).modules())
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_gives_identical_gradients_and_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    plain = DraemModel(8, 4, 3, 3)
    init_weights(plain)
    ckpt = DraemModel(8, 4, 3, 3, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(4, 3, 24, 24)
    for model in (plain, ckpt):
        model.train()
        rec, logits = model(x)
        (rec.square().mean() + logits.square().mean()).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    # BatchNorm counted the batch once, although the checkpointed blocks ran their forward twice.
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b, a, msg=name)


def test_invalid_image_size_is_rejected_with_nearby_sizes() -> None:
    with pytest.raises(ConfigError, match=r"multiple of 32; use 96 or 128"):
        DraemConfig().validate(CommonConfig(image_size=100))
    DraemConfig().validate(CommonConfig(image_size=96))
    with pytest.raises(ConfigError, match="multiple of 8"):
        DraemConfig(recon_levels=4, disc_levels=4).validate(CommonConfig(image_size=36))


def test_anomaly_source_folder_is_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="neither a folder"):
        DraemConfig(anomaly_source=str(tmp_path / "missing")).validate(CommonConfig())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no images"):
        DraemConfig(anomaly_source=str(tmp_path)).validate(CommonConfig())


@pytest.mark.parametrize("profile", ["cpu", "paper", "texture"])
def test_profiles_load_and_validate(profile: str) -> None:
    run = build_run_config(DraemConfig, profile, [])
    assert isinstance(run.method_config, DraemConfig)
    assert get_detector_class("draem") is DraemDetector
    if profile == "texture":  # the cpu schedule on half-resolution tiles, with the networks it was measured with
        cpu = build_run_config(DraemConfig, "cpu", []).method_config
        cfg = run.method_config
        assert run.common.tiling.enabled and run.common.tiling.scale == 0.5 and run.common.image_size == 128
        assert (cfg.steps, cfg.lr, cfg.lr_milestones) == (cpu.steps, cpu.lr, cpu.lr_milestones)
        assert (cfg.recon_width, cfg.disc_width, cfg.smoothing_kernel) == (16, 8, 21)
    if profile == "paper":
        cfg = run.method_config
        assert (cfg.recon_width, cfg.disc_width, cfg.epochs, run.common.image_size) == (128, 64, 700, 256)
        assert [round(f * 700) for f in cfg.lr_milestones] == [400, 600]


# --------------------------------------------------------------------------------------------
# detector


def test_predict_maps_scores_and_input_guard() -> None:
    det = DraemDetector(tiny_run(32), torch.device("cpu"))
    pred = det.predict(torch.rand(3, 3, 32, 32))
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, 32, 32)
    assert pred.scores.dtype == torch.float32 and pred.maps.dtype == torch.float32
    torch.testing.assert_close(pred.scores, pred.maps.flatten(1).amax(1))
    assert float(pred.maps.min()) >= 0.0 and float(pred.maps.max()) <= 1.0
    normalised = (torch.rand(1, 3, 32, 32) - 0.45) / 0.225  # ImageNet-style statistics
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        det.predict(normalised)


def test_bf16_and_unfused_inference_close_to_fp32() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    base = DraemDetector(tiny_run(32), torch.device("cpu"))
    ref = base.predict(x)
    for kwargs in ({"inference_bf16": True}, {"fuse_bn": False}):
        other = DraemDetector(tiny_run(32, **kwargs), torch.device("cpu"))
        other.load_state_dict(base.state_dict())
        torch.testing.assert_close(other.predict(x).scores, ref.scores, atol=0.02, rtol=0)


def test_state_dict_roundtrip_through_safetensors(tmp_path) -> None:
    det = DraemDetector(tiny_run(32, steps=3), torch.device("cpu"))
    det.fit(random_uint8(6, 32), TrainContext())
    x = torch.rand(3, 3, 32, 32)
    before = det.predict(x)
    save_file(det.state_dict(), str(tmp_path / "model.safetensors"))
    other = DraemDetector(tiny_run(32, steps=3), torch.device("cpu"))
    other.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    after = other.predict(x)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


def recording_checkpoints() -> tuple[Callable[[dict], None], list[bytes]]:
    """An ``on_checkpoint`` that serialises each state at once, like the engine's writer; the saved bytes."""
    saved: list[bytes] = []

    def on_checkpoint(state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        saved.append(buf.getvalue())

    return on_checkpoint, saved


def load_checkpoints(saved: list[bytes]) -> list[dict]:
    return [torch.load(io.BytesIO(b), weights_only=True) for b in saved]  # plain tensors and numbers only


def assert_same_weights(a: DraemDetector, b: DraemDetector) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=1e-6, rtol=0, msg=key)


def test_resume_continues_identically() -> None:
    images = random_uint8(6, 32)
    on_checkpoint, saved = recording_checkpoints()
    full = DraemDetector(tiny_run(32, steps=6), torch.device("cpu"))
    summary = full.fit(images, TrainContext(on_checkpoint=on_checkpoint, checkpoint_every_s=0.0))
    by_step = {state["step"]: state for state in load_checkpoints(saved)}
    assert summary.steps == 6 and 3 in by_step

    resumed = DraemDetector(tiny_run(32, steps=6), torch.device("cpu"))
    summary2 = resumed.fit(images, TrainContext(resume_state=by_step[3]))
    assert summary2.steps == 6 and summary2.resumed_from_step == 3
    assert_same_weights(full, resumed)


def test_time_budget_shortens_schedule() -> None:
    det = DraemDetector(tiny_run(32, steps=100_000), torch.device("cpu"))
    summary = det.fit(random_uint8(8, 32), TrainContext(time_budget_s=3.0))
    assert summary.steps < 100_000
    assert "to fit the time budget" in summary.schedule_note


def _textures_with_defects(n: int, size: int, defective: bool, seed: int) -> torch.Tensor:
    """Grey stripes with mild noise; defective ones get a dark disc (obvious, 8-12 px)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for _ in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        img = 0.55 + 0.15 * np.sin(2 * np.pi * xx / 8.0 + phase) + rng.normal(0, 0.02, (size, size))
        if defective:
            cy, cx = rng.uniform(12, size - 12, 2)
            r = rng.uniform(4, 6)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.1
        out.append(np.repeat(np.clip(img, 0, 1)[None], 3, axis=0))
    return torch.from_numpy((np.stack(out) * 255 + 0.5).astype(np.uint8))


@pytest.mark.slow
def test_short_training_separates_good_from_defective() -> None:
    size = 48
    run = tiny_run(
        size, recon_width=8, disc_width=8, steps=150, lr=1e-3, smoothing_kernel=7, anomaly_source="structured"
    )
    run.common.batch_size = 8
    det = DraemDetector(run, torch.device("cpu"))
    det.fit(_textures_with_defects(40, size, False, 0), TrainContext())
    good = _textures_with_defects(16, size, False, 1).float() / 255
    bad = _textures_with_defects(16, size, True, 2).float() / 255
    scores = torch.cat([det.predict(good).scores, det.predict(bad).scores]).numpy()
    auroc = roc_auc_score([0] * 16 + [1] * 16, scores)
    assert auroc > 0.85, auroc
