"""UniMo's deformable predictor (``unimo.deform_net``): the velocity U-Net, its band-limited
prediction, the separate image and shape losses, synthetic training on a real brain (nilearn's
MNI152 template on a 6 mm working grid), and storage. All real computations, one thread.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from unimo_bids.unimo import deform_net, epdiff
from unimo_bids.unimo.shape import signed_distance



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def brain():
    """MNI template on a 6 mm RAS working grid: (volume (1,1,X,Y,Z), mask, spacing)."""
    from nilearn.datasets import load_mni152_template  # shipped with nilearn: no download

    img = load_mni152_template(resolution=2)
    return deform_net.volume_on_grid(np.asarray(img.get_fdata(), dtype=np.float32), img.affine,
                                     spacing_mm=6.0)[:3]


def _ball_distance(shape, center, radius, spacing):
    index = np.indices(shape).astype(float)
    r = np.sqrt(sum(((index[i] - center[i]) * spacing[i]) ** 2 for i in range(3)))
    return signed_distance(r < radius, spacing)


def test_untrained_net_predicts_identity_on_a_non_cubic_grid():
    torch.manual_seed(0)
    net = deform_net.VelocityUNet()
    grid = (30, 26, 22)
    moving = torch.rand(2, 1, *grid)
    fixed = torch.rand(2, 1, *grid)
    distance = torch.as_tensor(_ball_distance(grid, (15, 13, 11), 25.0, (3.0,) * 3))
    shapes = distance[None, None].expand(2, 1, *grid)
    field = net(deform_net.network_input(net, moving, fixed, shapes, shapes))
    assert field.shape == (2, 3, *grid)
    assert float(field.abs().max()) == 0.0
    v = deform_net.predict_velocity(net, moving, fixed, shapes, shapes, band=12)
    assert v.shape == (2, 3, 12, 12, 12) and v.is_complex()
    assert float(v.abs().max()) == 0.0
    # Once the head is not zero, the field is not zero and the grid size is kept.
    torch.nn.init.normal_(net.head.weight, std=0.01)
    assert float(net(deform_net.network_input(net, moving, fixed, shapes, shapes)).abs().max()) > 0
    with pytest.raises(ValueError, match="shape"):
        deform_net.predict_velocity(net, moving, fixed)
    plain = deform_net.VelocityUNet(shape_inputs=False)
    assert plain(deform_net.network_input(plain, moving, fixed)).shape == (2, 3, *grid)


def test_predictions_are_band_limited_real_fields():
    torch.manual_seed(1)
    net = deform_net.VelocityUNet()
    torch.nn.init.normal_(net.head.weight, std=0.05)
    grid = (30, 26, 22)
    moving, fixed = torch.rand(1, 1, *grid), torch.rand(1, 1, *grid)
    shape = torch.as_tensor(_ball_distance(grid, (15, 13, 11), 20.0, (3.0,) * 3))[None, None]
    v = deform_net.predict_velocity(net, moving, fixed, shape, shape, band=16)
    assert float(v.abs().max()) > 1e-4
    # Hermitian (the field is real), Nyquist rows zero, and a fixed point of band_limit.
    assert torch.allclose(epdiff.project_real(v), v, atol=1e-6)
    field = epdiff.to_spatial(v, grid)
    assert not field.is_complex()
    assert torch.allclose(epdiff.band_limit(field, 16), v, atol=1e-5)
    # The raw net field has content above the band; the prediction does not.
    raw = net(deform_net.network_input(net, moving, fixed, shape, shape))
    assert float((raw - field).abs().max()) > 1e-3


def test_losses_vanish_for_identity_and_grow_with_deformation(brain):
    volume, mask, spacing = brain
    grid = tuple(volume.shape[2:])
    distance = torch.as_tensor(signed_distance(mask[0, 0].numpy(), spacing))[None, None]
    zero = torch.zeros((1, 3, 16, 16, 16), dtype=torch.complex64)
    same = deform_net.deformable_losses(zero, volume, volume, distance, distance, spacing, mask)
    assert float(same["image"]) < 1e-10 and float(same["shape"]) < 1e-10
    assert float(same["regulariser"]) == 0.0

    velocity = epdiff.random_velocity(2, grid, spacing, 1.0, torch.Generator().manual_seed(3))
    velocity = velocity * torch.tensor([2.0, 6.0]).view(2, 1, 1, 1, 1)
    u = epdiff.shoot(velocity, grid, spacing)
    moved = epdiff.warp(volume, u, spacing)
    # The shape map of the deformed mask, from the mask itself (a distance transform).
    moved_mask = epdiff.warp(mask.float().expand(2, 1, *grid), u, spacing) > 0.5
    moved_shape = torch.as_tensor(signed_distance(moved_mask[:, 0].numpy(), spacing))[:, None]
    terms = deform_net.deformable_losses(zero.expand(2, -1, -1, -1, -1), moved, volume,
                                         moved_shape, distance, spacing, mask,
                                         true_velocity=velocity)
    print("image", terms["image"].tolist(), "shape", terms["shape"].tolist())
    # (A 2 mm field can leave the 6 mm mask unchanged after thresholding; 6 mm cannot.)
    assert bool((terms["image"] > 1e-4).all()) and float(terms["shape"][1]) > 1e-4
    assert float(terms["image"][1]) > float(terms["image"][0])
    assert float(terms["shape"][1]) > float(terms["shape"][0])
    assert float(terms["supervised"][1]) > float(terms["supervised"][0]) > 0
    # The shape term alone sees a deformed mask with identical images.
    only_shape = deform_net.deformable_losses(zero, volume, volume, moved_shape[1:], distance,
                                              spacing, mask)
    assert float(only_shape["image"]) < 1e-10 and float(only_shape["shape"]) > 1e-4
    # The correcting velocity of a synthetic pair lowers both terms below the identity's.
    pairs = deform_net.synthetic_pairs(volume, mask, spacing, 2, torch.Generator().manual_seed(4),
                                       max_displacement_mm=(5.0, 6.0), augment=False)
    at_truth = deform_net.deformable_losses(pairs.velocity, pairs.moving, pairs.fixed,
                                            pairs.moving_shape, pairs.fixed_shape, spacing, mask)
    at_zero = deform_net.deformable_losses(zero.expand(2, -1, -1, -1, -1), pairs.moving,
                                           pairs.fixed, pairs.moving_shape, pairs.fixed_shape,
                                           spacing, mask)
    assert bool((at_truth["image"] < 0.8 * at_zero["image"]).all())
    # The pairs' moving masks are thresholded at random levels on the 6 mm grid, which moves
    # their boundary by up to half a voxel: the shape term is measured on the exact deformed
    # distance map here.
    forward = epdiff.shoot_maps(pairs.velocity, grid, spacing).forward
    exact_shape = epdiff.warp(pairs.fixed_shape, forward, spacing)
    at_truth = deform_net.deformable_losses(pairs.velocity, pairs.moving, pairs.fixed,
                                            exact_shape, pairs.fixed_shape, spacing, mask)
    at_zero = deform_net.deformable_losses(zero.expand(2, -1, -1, -1, -1), pairs.moving,
                                           pairs.fixed, exact_shape, pairs.fixed_shape,
                                           spacing, mask)
    assert bool((at_truth["shape"] < 0.8 * at_zero["shape"]).all())
    assert float(at_truth["regulariser"].min()) > 0


def test_short_training_beats_the_identity():
    from nilearn.datasets import load_mni152_template

    # A 7 mm grid (26x30x28): 50 steps took 37 s on 2 threads here (54 s at 6 mm).
    img = load_mni152_template(resolution=2)
    volume, mask, spacing, _ = deform_net.volume_on_grid(
        np.asarray(img.get_fdata(), dtype=np.float32), img.affine, spacing_mm=7.0)
    torch.manual_seed(0)
    net = deform_net.VelocityUNet()
    started = time.perf_counter()
    torch.set_num_threads(2)  # batches of 4: 2 threads take 40 % off
    try:
        record = deform_net.train_velocity_predictor(
            net, volume, mask, spacing, steps=50, warmup=1.0, batch=4, pool_size=8, reuse=2,
            max_displacement_mm=(3.0, 6.0), learning_rate=3e-3, seed=0)
    finally:
        torch.set_num_threads(1)  # the module's setting (fixture one_torch_thread)
    elapsed = time.perf_counter() - started
    before, after = record.errors_mm[0][1], record.final_error_mm
    print(f"grid {tuple(volume.shape[2:])}, {len(record.losses)} steps "
          f"({record.supervised_steps} supervised), {record.seconds / len(record.losses):.2f} s "
          f"per step, {elapsed:.1f} s in all; held-out error: zero {record.zero_error_mm:.3f} mm, "
          f"untrained {before:.3f} mm, trained {after:.3f} mm")
    assert len(record.losses) == 50 and record.supervised_steps == 50
    assert abs(before - record.zero_error_mm) < 1e-3  # the untrained net is the identity
    # A stated margin: at least 5 % below the identity's error.
    assert after < 0.95 * record.zero_error_mm


def test_save_load_round_trip_and_corrupt_file(tmp_path):
    torch.manual_seed(2)
    net = deform_net.VelocityUNet(widths=(4, 8, 8))
    torch.nn.init.normal_(net.head.weight, std=0.05)
    grid = (20, 18, 16)
    moving, fixed = torch.rand(1, 1, *grid), torch.rand(1, 1, *grid)
    shape = torch.as_tensor(_ball_distance(grid, (10, 9, 8), 15.0, (3.0,) * 3))[None, None]
    path = tmp_path / "predictor.pt"
    deform_net.save_predictor(net, path)
    loaded = deform_net.load_predictor(path)
    with torch.no_grad():
        a = deform_net.predict_velocity(net.eval(), moving, fixed, shape, shape, band=12)
        b = deform_net.predict_velocity(loaded, moving, fixed, shape, shape, band=12)
    assert float(a.abs().max()) > 0 and torch.equal(a, b)

    broken = tmp_path / "broken.pt"
    data = path.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="broken.pt") as info:
        deform_net.load_predictor(broken)
    assert "\n" not in str(info.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "something-else"}, foreign)
    with pytest.raises(ValueError, match="foreign.pt"):
        deform_net.load_predictor(foreign)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.bias"] = payload["state_dict"]["head.bias"] + 0.5
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="edited.pt.*SHA-256"):
        deform_net.load_predictor(tmp_path / "edited.pt")


def test_predict_from_masks_reads_the_masks_signed_distances(brain):
    volume, mask, spacing = brain
    torch.manual_seed(3)
    net = deform_net.VelocityUNet(widths=(4, 8, 8)).eval()
    torch.nn.init.normal_(net.head.weight, std=0.05)
    pairs = deform_net.synthetic_pairs(volume, mask, spacing, 2, torch.Generator().manual_seed(6),
                                       augment=False)
    moved_mask = pairs.moving_shape < 0
    v = deform_net.predict_from_masks(net, pairs.moving, pairs.fixed[:1], moved_mask, mask,
                                      spacing)
    with torch.no_grad():
        direct = deform_net.predict_velocity(net, pairs.moving, pairs.fixed[:1],
                                             pairs.moving_shape, pairs.fixed_shape[:1])
    assert v.shape == (2, 3, 16, 16, 16) and float(v.abs().max()) > 0
    assert torch.allclose(v, direct, atol=1e-5)
    # Another mask is another input: the shape channels are read.
    other = deform_net.predict_from_masks(net, pairs.moving, pairs.fixed[:1], moved_mask,
                                          torch.zeros_like(mask), spacing)
    assert not torch.allclose(v, other, atol=1e-5)


def test_train_command_writes_a_loadable_predictor_and_its_card(tmp_path, capsys):
    from unimo_bids.cli.train import main

    out = tmp_path / "velocity.pt"
    assert main([str(out), "--model", "deformable", "--minutes", "0.1", "--batch", "2",
                 "--validate-every", "4", "--nthreads", "1"]) == 0
    net = deform_net.load_predictor(out)
    assert isinstance(net, deform_net.VelocityUNet) and not net.training
    payload = torch.load(out, weights_only=True)
    assert payload["notes"]["command"].startswith("unimo-bids-train")
    assert payload["notes"]["steps"] > 0
    card = out.with_suffix(".md").read_text()
    assert "unimo-bids-train" in card and "| 0 |" in card
    assert "held-out error" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.part"))
    # The packaged predictor was made by the same command.
    packaged = torch.load(deform_net.DEFAULT_PREDICTOR, weights_only=True)
    assert packaged["notes"]["command"].startswith("unimo-bids-train")
    assert deform_net.DEFAULT_PREDICTOR.stat().st_size < 20e6
