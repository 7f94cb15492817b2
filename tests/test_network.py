"""The UniMo rigid network: checkpoints, branch estimates, the engine with and without
refinement, and the training data and command.

Any-rotation capture (measured with the packaged weights of 2026-11-21, MNI152 on a 56^3 grid of 4 mm, 1 %
noise, rotations uniform on SO(3), translations up to 10 mm; 12 volumes by hand, the 6 below in
the tests): refinement started from the better of the identity and the network's estimate
recovers every pose to about 0.02 mm; the network alone is 1.9 mm off on average (max 2.6) on
this, its training anatomy, and much worse on real scans (docs/benchmarks.md, section 8).
"""

from __future__ import annotations

import numpy as np
import pytest
import roma
import torch
from scipy import ndimage

from unimo_bids.cli.train import main as train_main
from unimo_bids.cli.train import mni_anatomy
from unimo_bids.unimo.geometry import centroids, grid_center, mean_displacement, world_points
from unimo_bids.unimo.hmc import estimate_head_motion
from unimo_bids.unimo.keypoints import to_working_grid
from unimo_bids.unimo.network import (
    DEFAULT_WEIGHTS,
    UniMoRigidNet,
    encode_inputs,
    load_network,
    network_estimates,
    save_network,
)
from unimo_bids.unimo.shape import signed_distance
from unimo_bids.unimo.synthetic import simulate_series
from unimo_bids.unimo.training import displacement_error, sample_pairs, train


@pytest.fixture(scope="module")
def network():
    return load_network()


@pytest.fixture(scope="module")
def any_rotation_series(mni_template):
    """MNI152 moved by rotations uniform on SO(3) (+ up to 10 mm) inside a 224 mm cube:
    (series, grid, truth (T, 4, 4) reference -> volume, masks, shape maps)."""
    data, affine = mni_template
    voxel, n, n_volumes = 4.0, 56, 6
    grid = np.diag([voxel, voxel, voxel, 1.0])
    grid[:3, 3] = grid_center(data.shape, affine) - voxel * (n - 1) / 2
    data = ndimage.gaussian_filter(data, 0.8)
    center = grid_center((n, n, n), grid)
    rotations = _rotations(n_volumes - 1)
    rng = np.random.default_rng(1)
    motions = np.tile(np.eye(4), (n_volumes, 1, 1))
    for i, rotation in enumerate(rotations, start=1):
        motions[i, :3, :3] = rotation
        motions[i, :3, 3] = center + rng.uniform(-10, 10, 3) - rotation @ center
    series = simulate_series(data, affine, motions, (n, n, n), grid).astype(np.float32)
    series += (0.01 * series.max() * rng.standard_normal(series.shape)).astype(np.float32)
    masks = series > 0.25 * series[..., 0].max()
    masks = np.stack([ndimage.binary_fill_holes(ndimage.binary_opening(masks[..., t]))
                      for t in range(n_volumes)], axis=-1)
    shapes = np.moveaxis(signed_distance(np.moveaxis(masks, -1, 0), [voxel] * 3), 0, -1)
    truth = np.linalg.inv(motions) @ motions[0]
    return series, grid, truth, masks, shapes


def _rotations(n: int) -> np.ndarray:
    """n rotations uniform on SO(3) (seeded), of at least 60 degrees each."""
    g = torch.Generator().manual_seed(5)
    out = []
    while len(out) < n:
        q = torch.randn(4, generator=g, dtype=torch.float64)
        rotation = roma.unitquat_to_rotmat(q / q.norm()).numpy()
        if np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))) >= 60:
            out.append(rotation)
    return np.stack(out)


def test_packaged_weights_load_with_their_training_record(network):
    assert DEFAULT_WEIGHTS["cpu"].is_file()
    assert DEFAULT_WEIGHTS["cpu"].stat().st_size < 20e6
    assert network.preset == "cpu" and not network.training
    info = network.training_info
    assert info["command"].startswith("unimo-bids-train") and info["steps"] > 0
    assert 0 < float(network.lam.detach()) < 1


def test_checkpoints_round_trip_and_bad_files_are_named(tmp_path):
    torch.manual_seed(0)
    net = UniMoRigidNet("cpu", num_keypoints=4, lam=0.3)
    save_network(net, tmp_path / "net.pt", {"note": "test"})
    again = load_network(tmp_path / "net.pt")
    assert again.num_keypoints == 4 and abs(float(again.lam.detach()) - 0.3) < 1e-6
    for name, value in net.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for path in (tmp_path / "junk.pt", tmp_path / "missing.pt"):
        with pytest.raises(ValueError, match=str(path)):
            load_network(path)
    # One weight changed after saving: the file still loads in torch and fits the architecture,
    # but no longer matches its recorded SHA-256.
    checkpoint = torch.load(tmp_path / "net.pt", weights_only=True)
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 1e-3
    torch.save(checkpoint, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="edited.pt.*SHA-256"):
        load_network(tmp_path / "edited.pt")
    del checkpoint["sha256"]
    torch.save(checkpoint, tmp_path / "unsigned.pt")
    with pytest.raises(ValueError, match="unsigned.pt.*no SHA-256"):
        load_network(tmp_path / "unsigned.pt")


def test_a_fixed_batch_of_one_serves_every_volume(network, mni_template):
    data, affine = mni_template
    grid_affine, grid_shape = network.grid(data.shape, affine, data > 0.3 * data.max())
    volumes = torch.as_tensor(data)[None, None].repeat(3, 1, 1, 1, 1)
    offsets = torch.tensor([[0.0, 0, 0], [4.0, 0, 0], [0, -6.0, 2.0]], dtype=torch.float64)
    image, _ = encode_inputs(volumes, None, affine, grid_affine, grid_shape, offsets)
    with torch.no_grad():
        one = network_estimates(network, image[:1], None, image, None, grid_affine,
                                offsets[:1], offsets, [0, 0, 0])
        many = network_estimates(network, image[:1].repeat(3, 1, 1, 1, 1), None, image, None,
                                 grid_affine, offsets[:1].repeat(3, 1), offsets, [0, 0, 0])
    torch.testing.assert_close(one.image, many.image)
    # Without shape inputs the fusion is the image estimate, and lambda reads 0.
    torch.testing.assert_close(one.fused, one.image)
    assert float(one.lam) == 0.0


def test_refinement_from_the_network_captures_any_rotation(network, any_rotation_series):
    series, grid, truth, masks, shapes = any_rotation_series
    points = world_points(series.shape, grid, masks[..., 0])
    result = estimate_head_motion(series, grid, series[..., 0], masks[..., 0], shapes,
                                  shapes[..., 0], network=network)
    errors = mean_displacement(result.transforms, truth, points)
    assert errors.max() < 0.1, errors
    # Without the network the refinement alone fails on some of these large rotations (the
    # test can fail), and on each of those one of the network's estimates (fused or shape
    # branch) was the start taken.
    classical = estimate_head_motion(series, grid, series[..., 0], masks[..., 0], shapes,
                                     shapes[..., 0])
    lost = mean_displacement(classical.transforms, truth, points) > 5.0
    assert lost.any()
    assert result.network_starts == 2
    assert np.isin(result.start[lost], [1, 2]).all(), (result.start, lost)


def test_no_refine_returns_the_fused_network_estimate(network, any_rotation_series):
    series, grid, truth, masks, shapes = any_rotation_series
    result = estimate_head_motion(series, grid, series[..., 0], masks[..., 0], shapes,
                                  shapes[..., 0], network=network, refine=False)
    np.testing.assert_array_equal(result.transforms, result.network.fused)
    assert np.isnan(result.residual).all() and (result.iterations == 0).all()
    errors = mean_displacement(result.transforms, truth,
                               world_points(series.shape, grid, masks[..., 0]))
    before = mean_displacement(np.tile(np.eye(4), (len(truth), 1, 1)), truth,
                               world_points(series.shape, grid, masks[..., 0]))
    assert errors[0] < 0.5  # the reference against itself
    assert np.all(errors[1:] < 0.25 * before[1:]), (errors, before)
    with pytest.raises(ValueError, match="needs a network"):
        estimate_head_motion(series, grid, series[..., 0], masks[..., 0], refine=False)


def test_centroids_are_world_means_and_nan_when_empty():
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    masks = np.zeros((2, 5, 5, 5), bool)
    masks[0, 1, 2, 3] = masks[0, 3, 2, 3] = True
    found = centroids(masks, affine)
    np.testing.assert_allclose(found[0], [10 + 2 * 2, 20 + 3 * 2, 30 + 4 * 3])
    assert np.isnan(found[1]).all()


@pytest.fixture(scope="module")
def anatomy():
    return mni_anatomy()


def test_training_pairs_carry_their_true_motion(anatomy):
    """Resampling each moved input back through its true transform gives the reference input
    (inside the brain): the generator's truth is what the network must learn."""
    net = UniMoRigidNet("cpu")
    grid_affine, grid_shape = net.grid(anatomy.brain.shape, anatomy.affine, anatomy.brain > 0.5)
    g = torch.Generator().manual_seed(3)
    pairs = sample_pairs(anatomy, grid_affine, grid_shape, 2, g, noise=0.0)
    assert pairs["moving_image"].shape == (2, 1, 49, 49, 49)
    # The moving grid sits at p + moving_offset; the reference's at p + fixed_offset.
    from unimo_bids.unimo.network import translations

    back = (torch.linalg.inv(translations(pairs["moving_offsets"])) @ pairs["truth"]
            @ translations(pairs["fixed_offsets"]))
    restored = to_working_grid(pairs["moving_shape"], grid_affine, grid_affine, grid_shape,
                               back, antialias=False, padding_mode="border")
    inside = (pairs["fixed_shape"] > 25) & (restored > 25)  # > 5 mm inside both brains
    assert inside.sum() > 1000
    error = (restored - pairs["fixed_shape"])[inside].abs().median()
    assert error < 4.0, error  # mm-scale: distance maps of different thresholds differ a bit
    # A wrong truth (the identity) would not restore it.
    wrong = to_working_grid(pairs["moving_shape"], grid_affine, grid_affine, grid_shape,
                            torch.eye(4, dtype=torch.float64).repeat(2, 1, 1), antialias=False,
                            padding_mode="border")
    assert (wrong - pairs["fixed_shape"])[inside].abs().median() > 2 * error


def test_displacement_error_is_the_mean_point_distance():
    points = torch.tensor([[0.0, 0, 0], [10.0, 0, 0]], dtype=torch.float64)
    shift = torch.eye(4, dtype=torch.float64)[None].clone()
    shift[0, :3, 3] = torch.tensor([3.0, 4.0, 0.0])
    assert float(displacement_error(shift, torch.eye(4, dtype=torch.float64)[None],
                                    points)) == pytest.approx(5.0)


def test_a_short_training_run_updates_the_weights(anatomy):
    torch.manual_seed(0)
    net = UniMoRigidNet("cpu", num_keypoints=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    summary = train(net, anatomy, minutes=0.0, batch=2, validation_pairs=2, log=lambda _: None)
    assert summary["steps"] == 0
    summary = train(net, anatomy, minutes=0.05, batch=2, validation_pairs=2, log=lambda _: None)
    assert summary["steps"] >= 1
    assert np.isfinite(list(summary["validation_any_rotation_mm_after"].values())).all()
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert "raw_lambda" in changed and len(changed) > 3


def test_train_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "net.pt"
    assert train_main([str(out), "--minutes", "0.02", "--batch", "2", "--keypoints", "4"]) == 0
    net = load_network(out)
    assert net.num_keypoints == 4
    assert net.training_info["command"].startswith("unimo-bids-train")
    assert "wrote" in capsys.readouterr().out
    assert train_main([str(out), "--init", str(out)]) == 2
    with pytest.raises(SystemExit) as stopped:
        train_main([str(out), "--steps", "0"])
    assert stopped.value.code == 2


def test_train_command_learns_from_images_resumes_and_refuses_bad_input(tmp_path, mni_template,
                                                                        capsys):
    """unimo-bids-train on a folder holding one small real image (the MNI template at 4 mm, as a
    4D series of two volumes), without the built-in template: the validation error of the fused
    estimate falls, a checkpoint written mid-run resumes with its optimizer state, and a broken
    image is refused in one line. A fixed step count keeps the result the same on any machine
    (CI once ran out of a 0.3-minute budget after 11 steps, short of learning)."""
    import nibabel as nb

    data, affine = mni_template
    small = ndimage.zoom(data, 0.5, order=1).astype(np.float32)
    small_affine = affine.copy()
    small_affine[:3, :3] *= 2.0
    folder = tmp_path / "images"
    folder.mkdir()
    nb.Nifti1Image(np.stack([small, small], -1), small_affine).to_filename(folder / "a.nii.gz")
    out = tmp_path / "net.pt"
    # Without the deformation augmenter: 20 steps learn the motion of an undeformed head, and
    # no more with it (measured: fused 53.4 -> 54.9 mm); test_alternating covers the augmenter.
    args = [str(out), "--images", str(folder), "--no-template", "--batch", "2",
            "--keypoints", "4", "--learning-rate", "0.01", "--nthreads", "1", "--seed", "1",
            "--deformation-mm", "0"]
    assert train_main(args + ["--steps", "20", "--minutes", "10",
                              "--checkpoint-minutes", "0.02"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint:" in printed
    info = load_network(out).training_info
    print(info["steps"], info["validation_any_rotation_mm_before"],
          info["validation_any_rotation_mm_after"])
    assert info["images"] == [str(folder / "a.nii.gz")] and info["steps"] == 20
    assert (info["validation_any_rotation_mm_after"]["fused"]
            < info["validation_any_rotation_mm_before"]["fused"])
    card = out.with_suffix(".md").read_text()
    assert "a.nii.gz" in card and "No scan" not in card
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["optimizer_state"]["state"]  # Adam moments, for --resume
    assert train_main(args[1:] + [str(tmp_path / "more.pt"), "--steps", "2",
                                  "--resume", str(out)]) == 0
    chain = load_network(tmp_path / "more.pt").training_info["continued_from"]
    assert chain["steps"] == info["steps"]
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    capsys.readouterr()
    assert train_main(args + ["--minutes", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and len(err.strip().splitlines()) == 1
