"""Generators against their references (DGH code, MCT DataGen, FDDA code): FDDA class pairing and
loss composition, ODSL units, stale-mode cache refresh, reduce-on-plateau after a cut."""
import math

import pytest
import torch
import torch.nn.functional as F

import zsq_fast
from test_generate import tiny
from zsq_fast.generate import api, dgh, fdda
from zsq_fast.generate.context import forward, output_images, see
from zsq_fast.generate.losses import bn_loss, odsl
from zsq_fast.generate.optim import Plateau
from zsq_fast.generate.views import draw_views


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _fdda_run(n_images, classes, chunk_size, real_classes=5):
    """An fdda run on TinyNet with `classes` outputs and real images of the first real_classes classes."""
    model = tiny(classes).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    real = torch.randn(2 * real_classes, 3, 8, 8, generator=g)
    labels = torch.arange(2 * real_classes) % real_classes
    s, dev = api.make_settings(model, n_images, "fdda", 8, chunk_size=chunk_size)
    run, out = api.build_run(model, s, dev)
    with run.capture:
        api._setup_fdda(run, s, real, labels, out.shape[-1])
    return model, run


def test_fdda_pairs_each_batch_with_its_own_class_centers_when_n_below_classes():
    # 5 classes, 2 images: the labels skip classes (0 and 2); batch 2 must use class 2's centers
    _, run = _fdda_run(n_images=2, classes=5, chunk_size=4)
    labels, centers = run.state["labels"], run.state["centers"]
    assert labels.tolist() == [0, 2]
    for k, sl in run.state["batches"]:
        assert (labels[sl] == centers.classes[k]).all()
    # labels and centers agree in general: every batch is one class, and that class's row
    _, run = _fdda_run(n_images=7, classes=5, chunk_size=2)
    labels, centers = run.state["labels"], run.state["centers"]
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3, 4]
    covered = []
    for k, sl in run.state["batches"]:
        assert (labels[sl] == centers.classes[k]).all()
        covered += list(range(sl.start, sl.stop))
    assert covered == list(range(7))


def test_fdda_class_batches_rejects_a_label_without_center():
    with pytest.raises(ValueError, match="no class center"):
        fdda.class_batches(torch.tensor([0, 3]), torch.tensor([0, 1, 2]), 4)


def test_fdda_deep_layers_follow_the_reference_count():
    # floor((L+1)/2) - 2 on: ResNet-18 has 20 BN layers -> the last 12
    assert list(fdda.deep_layers(20)) == list(range(8, 20))
    assert list(fdda.deep_layers(19)) == list(range(8, 19))
    assert list(fdda.deep_layers(1)) == [0]


def test_fdda_gradient_is_the_whole_set_bn_loss_plus_batch_averaged_class_terms():
    """L = 0.2 L_BN(all N images, mixed labels) + sum_b |b|/N (0.5 CE_b + 0.9 L_D,b + 0.01 L_C,b),
    L_C, L_D averaged over the deep layers; labels skip classes (n < classes). L_BN on variances, as the
    FDDA code (MSE(var, running_var)), not on the standard deviations dgh matches."""
    model, run = _fdda_run(n_images=3, classes=5, chunk_size=4)
    run.state.update(noise_mean_std=0.0, noise_var_std=0.0)  # L_D == L_C: no random draw to replay
    w, centers, labels = run.state["weights"], run.state["centers"], run.state["labels"]
    deep = fdda.deep_layers(len(run.layers))
    grads = torch.zeros_like(run.store.x)
    with run.capture:
        losses = fdda.fdda_gradients(run, None, lambda sl, x, g, m, v: grads[sl].copy_(g))
        x = run.store.x.clone().requires_grad_(True)
        acts, logits = forward(run, see(run, x, None))
        stats = [(a.double().mean((0, 2, 3)), a.double().var((0, 2, 3), unbiased=False)) for a in acts]
        var_targets = [(mu, sigma.square()) for mu, sigma in run.targets]
        loss = w["bn"] * bn_loss(stats, var_targets, run.weights, run.lambda_sigma)
        for k, sl in run.state["batches"]:
            ce = F.cross_entropy(logits[sl], labels[sl])
            center = sum((acts[1 + l][sl].mean((0, 2, 3)) - centers.mean[l][k]).square().mean()
                         + (acts[1 + l][sl].var((0, 2, 3), unbiased=False) - centers.var[l][k]).square().mean()
                         for l in deep) / len(deep)
            loss = loss + (sl.stop - sl.start) / run.n * (w["ce"] * ce + (w["distort"] + w["center"]) * center)
        (ref,) = torch.autograd.grad(loss, x)
    assert ref.abs().max() > 0
    torch.testing.assert_close(grads, ref.float(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert losses["total"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert losses["bn"] == pytest.approx(float(bn_loss(stats, var_targets, run.weights, run.lambda_sigma).detach()),
                                         rel=1e-6)


def test_fdda_lr_schedule_watches_the_total_without_the_distortion_noise():
    """The plateau schedule gets L with L_C in place of L_D: L_D's centres are redrawn every step, and that
    noise alone cut the lr. With the noise on, the reported total moves; the scheduled value does not."""
    _, run = _fdda_run(n_images=4, classes=5, chunk_size=4)
    w = run.state["weights"]
    with run.capture:
        draws = [fdda.fdda_gradients(run, None, lambda *a: None) for _ in range(3)]  # images unchanged
    for d in draws:
        assert d["schedule"] == pytest.approx(d["total"] + w["distort"] * (d["center"] - d["distort"]), rel=1e-9)
    assert len({round(d["total"], 9) for d in draws}) == 3  # the noisy total differs from draw to draw
    assert all(d["schedule"] == pytest.approx(draws[0]["schedule"], rel=1e-6) for d in draws)


def test_odsl_weight_is_in_per_image_units_of_the_reference_batch():
    """Per image, the ODSL gradient is w / ODSL_REF_BATCH (MCT's batch 32) whatever the chunk size: with the
    BN loss removed (lambda_sigma 0, targets met by construction is hard), compare two chunk sizes."""
    model = tiny().eval().requires_grad_(False)

    def odsl_grad(chunk, mode):
        s, dev = api.make_settings(model, 4, "dgh", 8, chunk_size=chunk, odsl_weight=1.0, odsl_form="plain",
                                   augment=False, aggregation=mode)
        run, _ = api.build_run(model, s, dev)
        run.weights = [0.0] * len(run.weights)  # L_BN off: only the ODSL term is left
        grads = torch.zeros_like(run.store.x)
        with run.capture:
            if mode == "stale":
                dgh.init_stale_cache(run, None)
            step = dgh.exact_gradients if mode == "exact" else dgh.stale_gradients
            losses = step(run, None, lambda sl, x, g, m, v: grads[sl].copy_(g))
            x = run.store.x.clone().requires_grad_(True)
            _, logits = forward(run, x)
            (per_image,) = torch.autograd.grad(odsl(logits).sum(), x)
        return grads, per_image, losses

    for mode in ("exact", "stale"):
        g4, per_image, losses = odsl_grad(4, mode)
        g2, _, _ = odsl_grad(2, mode)
        torch.testing.assert_close(g4, per_image / 32, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(g2, per_image / 32, rtol=1e-4, atol=1e-9)
        assert losses["total"] == pytest.approx(4 * losses["odsl"] / 32, rel=1e-5)  # w / 32 * sum_i L_out,i
    s, _ = api.make_settings(model, 4, "dgh", 8)
    assert s.odsl_weight == 1e-5 and s.odsl_units == "per_image_ref32"


def test_stale_refresh_after_update_caches_the_finalised_images():
    """after_update (default, as the DGH code): a chunk's cache holds the statistics of its updated images
    in their output view; before_update: those of the step's own (pre-update, randomly viewed) forward."""
    model = tiny().eval().requires_grad_(False)
    for refresh in ("after_update", "before_update"):
        _, rec = zsq_fast.generate(model, 6, "dgh", 8, iterations=2, chunk_size=3, aggregation="stale",
                                   stale_refresh=refresh, lr=0.5)
        assert rec.settings["stale_refresh"] == refresh
    s, dev = api.make_settings(model, 6, "dgh", 8, chunk_size=3, aggregation="stale", lr=0.5)
    assert s.stale_refresh == "after_update" and s.augment
    run, _ = api.build_run(model, s, dev)
    g = torch.Generator().manual_seed(3)
    with run.capture:
        dgh.init_stale_cache(run, draw_views(run.n, s.margin, g))
        run.step = 1
        dgh.stale_step(run, draw_views(run.n, s.margin, g))
        for sl, cached in zip(run.store.chunks(3), run.state["cache"]):
            final = finalised_means(run, sl)
            assert torch.allclose(cached[1].mean.double(), final, rtol=1e-5, atol=1e-6)
        run.state["stale_refresh"] = "before_update"
        run.step = 2
        views = draw_views(run.n, s.margin, g)
        pre = [viewed_means(run, sl, views[sl]) for sl in run.store.chunks(3)]
        dgh.stale_step(run, views)
        for sl, cached, before in zip(run.store.chunks(3), run.state["cache"], pre):
            assert torch.allclose(cached[1].mean.double(), before, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(cached[1].mean.double(), finalised_means(run, sl), atol=1e-6)
    with pytest.raises(ValueError, match="stale_refresh"):
        api.make_settings(model, 6, "dgh", 8, aggregation="stale", stale_refresh="sometimes")


@torch.no_grad()
def finalised_means(run, sl):
    acts, _ = forward(run, output_images(run, run.store.x[sl]))
    return acts[1].double().mean((0, 2, 3))


@torch.no_grad()
def viewed_means(run, sl, views):
    acts, _ = forward(run, see(run, run.store.x[sl], views))
    return acts[1].double().mean((0, 2, 3))


def test_plateau_forgets_its_best_loss_after_a_cut():
    p = Plateau(lr=1.0, patience=2, factor=0.5, min_lr=1e-3)
    for loss in (1.0, 2.0, 2.0, 2.0):  # best 1.0, then 3 bad steps > patience 2 -> cut
        p.step(loss)
    assert p.lr == 0.5 and p.best == math.inf
    # at the new lr, 1.5 is the best seen: no second cut right away although 1.5 > 1.0
    for loss in (1.5, 1.5, 1.5):
        p.step(loss)
    assert p.lr == 0.5
    p.step(1.5)
    assert p.lr == 0.25
