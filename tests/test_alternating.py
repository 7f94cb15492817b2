"""Alternating optimisation of the rigid network and the deformable predictor, and the
geometric deformation augmenter of the rigid training pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unimo_bids.cli.train import main as train_main
from unimo_bids.cli.train import mni_anatomy
from unimo_bids.unimo import deform_net
from unimo_bids.unimo.alternating import DeformableVolume, realign_by_network
from unimo_bids.unimo.geometry import world_points
from unimo_bids.unimo.network import UniMoRigidNet, load_network
from unimo_bids.unimo.training import (
    alignment_loss,
    displacement_error,
    random_deformations,
    sample_pairs,
    train,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _jacobian_determinants(field: torch.Tensor, spacing: float) -> torch.Tensor:
    """det(I + du/dx) of (B, 3, X, Y, Z) displacements (mm): (B, X, Y, Z)."""
    derivatives = torch.gradient(field, spacing=spacing, dim=(2, 3, 4))  # d u / d x_j
    jacobian = torch.stack([torch.stack([derivatives[j][:, i] for j in range(3)], -1)
                            for i in range(3)], -2)
    return torch.linalg.det(jacobian + torch.eye(3))


def test_deformations_are_smooth_invertible_and_as_large_as_asked():
    fields = random_deformations(16, (49, 49, 49), 4.0, torch.Generator().manual_seed(0))
    largest = fields.norm(dim=1).flatten(1).amax(1)
    assert float(largest.max()) <= 4.0 + 1e-4 and float(largest.max()) > 2.0
    assert float(largest.std()) > 0.3  # sizes are drawn, not fixed
    determinants = _jacobian_determinants(fields, 4.0)
    print(f"Jacobian determinant {float(determinants.min()):.3f}-{float(determinants.max()):.3f}")
    assert float(determinants.min()) > 0.5  # invertible everywhere, no folding


def test_deformed_pairs_keep_their_rigid_truth():
    """The augmenter changes what the network sees but not the motion it must find."""
    anatomy = mni_anatomy()
    net = UniMoRigidNet("cpu")
    grid_affine, grid_shape = net.grid(anatomy.brain.shape, anatomy.affine, anatomy.brain > 0.5)
    plain = sample_pairs(anatomy, grid_affine, grid_shape, 2, torch.Generator().manual_seed(4),
                         noise=0.0)
    deformed = sample_pairs(anatomy, grid_affine, grid_shape, 2,
                            torch.Generator().manual_seed(4), noise=0.0, deformation_mm=4.0)
    assert torch.equal(plain["truth"], deformed["truth"])
    # Shape inputs are clipped distance maps, constant away from the boundary: they change less.
    for key, least_change in (("fixed_image", 0.01), ("moving_image", 0.01),
                              ("moving_shape", 0.003)):
        a, b = plain[key].flatten(1), deformed[key].flatten(1)
        changed = (a - b).abs().mean(1) / a.abs().mean(1)
        correlation = torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True),
                                                            b - b.mean(1, keepdim=True))
        print(key, changed.tolist(), correlation.tolist())
        assert float(changed.min()) > least_change  # deformed ...
        assert float(correlation.min()) > 0.8  # ... locally, not replaced


def test_alignment_loss_is_lowest_at_the_true_motion_and_has_gradients():
    """The unsupervised rigid loss needs no known transform but points to it."""
    anatomy = mni_anatomy()
    net = UniMoRigidNet("cpu")
    grid_affine, grid_shape = net.grid(anatomy.brain.shape, anatomy.affine, anatomy.brain > 0.5)
    pairs = sample_pairs(anatomy, grid_affine, grid_shape, 3, torch.Generator().manual_seed(2),
                         any_rotation=0.0, max_translation_mm=10.0)
    truth = pairs["truth"]
    at_truth = alignment_loss(truth, pairs, grid_affine)
    at_identity = alignment_loss(torch.eye(4, dtype=torch.float64).expand(3, 4, 4), pairs,
                                 grid_affine)
    print("at truth", at_truth.tolist(), "at identity", at_identity.tolist())
    assert (at_truth < at_identity).all() and (at_truth < 0.3).all()
    shift = torch.zeros(3, requires_grad=True, dtype=torch.float64)
    nudged = truth.clone()
    nudged[:, :3, 3] = nudged[:, :3, 3] + shift
    alignment_loss(nudged, pairs, grid_affine).sum().backward()
    assert shift.grad is not None and torch.isfinite(shift.grad).all()


def test_rigid_training_without_the_known_transform_updates_the_weights():
    anatomy = mni_anatomy()
    torch.manual_seed(0)
    net = UniMoRigidNet("cpu", num_keypoints=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    summary = train(net, anatomy, minutes=10.0, batch=2, validation_pairs=2, max_steps=2,
                    supervised_warmup=0.0, log=lambda _: None)
    assert summary["steps"] == 2 and summary["supervised_warmup"] == 0.0
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 3


@pytest.fixture(scope="module")
def template_on_grid():
    from nilearn.datasets import load_mni152_template  # shipped with nilearn: no download

    img = load_mni152_template(resolution=2)
    return DeformableVolume(*deform_net.volume_on_grid(
        np.asarray(img.dataobj, dtype=np.float32), img.affine, spacing_mm=6.0))


def test_the_rigid_stage_realigns_the_deformable_pairs(template_on_grid):
    """The deformable stage's pairs are moved rigidly and brought back by the packaged rigid
    network: what is left is far smaller than the motion (measured: 8-19 mm motions left at
    1.1-7.5 mm by the network alone), and smaller again after the app's refinement (0.1-1.0
    mm: the deformation, up to 6 mm, is not rigid)."""
    data = template_on_grid
    pairs = deform_net.synthetic_pairs(data.volume, data.mask, data.spacing, 6,
                                       torch.Generator().manual_seed(0))
    network = load_network()
    realigned, truth, estimate = realign_by_network(network, pairs, data,
                                                    torch.Generator().manual_seed(1))
    points = torch.as_tensor(world_points(data.mask.shape[2:], data.affine,
                                          data.mask[0, 0].numpy()))
    motion = displacement_error(torch.eye(4, dtype=torch.float64).expand(6, 4, 4), truth, points)
    left = displacement_error(estimate, truth, points)
    print(f"motion {motion.mean():.2f} mm, left after the network {left.mean():.2f} mm")
    assert float(motion.min()) > 3.0
    assert float(left.mean()) < 0.5 * float(motion.mean())
    # The realigned volume is the deformed one where the estimate is right: closer to it than
    # a volume left at the truth's motion would be.
    assert realigned.moving.shape == pairs.moving.shape
    assert torch.equal(realigned.fixed, pairs.fixed)
    best = int(torch.argmin(left))
    inside = data.mask[0, 0]
    error = (realigned.moving[best, 0] - pairs.moving[best, 0])[inside].abs().mean()
    assert float(error) < 0.25, float(error)
    _, same_truth, refined = realign_by_network(network, pairs, data,
                                                torch.Generator().manual_seed(1), refine=True)
    assert torch.equal(same_truth, truth)
    left_refined = displacement_error(refined, truth, points)
    print(f"left after the refinement {left_refined.mean():.2f} mm")
    assert float(left_refined.mean()) < 0.5 * float(left.mean())


def test_train_command_alternates_the_rigid_and_deformable_stages(tmp_path, capsys):
    out = tmp_path / "rigid.pt"
    args = [str(out), "--model", "both", "--rounds", "2", "--round-steps", "2", "3",
            "--batch", "2", "--keypoints", "4", "--grid-mm", "8", "--warmup", "0.5",
            "--nthreads", "1", "--seed", "3", "--validation-pairs", "4",
            "--supervised-warmup", "0.5"]
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert "round 2: wrote" in printed and "deformable predictor" in printed
    rigid = load_network(out)
    info = rigid.training_info
    assert info["steps"] == 4 and info["alternating"]["rounds"] == 2
    assert info["deformation_mm"] == 3.0  # the augmenter is on by default
    velocity_path = tmp_path / "rigid_velocity.pt"
    predictor = deform_net.load_predictor(velocity_path)
    notes = torch.load(velocity_path, weights_only=True)["notes"]
    assert notes["steps"] == 6 and notes["rigid_network"] == "rigid.pt"
    assert [step for step, _ in notes["errors_mm"]] == [0, 3, 6]
    assert np.isfinite([error for _, error in notes["errors_mm"]]).all()
    assert sum(p.abs().sum() for p in predictor.parameters()) > 0
    rigid_card = out.with_suffix(".md").read_text()
    velocity_card = velocity_path.with_suffix(".md").read_text()
    assert "alternating optimisation" in rigid_card and "augmenter" in rigid_card
    assert "1 - NCC" in rigid_card  # half the rigid steps on the alignment loss
    assert "realigned by the app's rigid stage" in velocity_card
    assert "--model both" in velocity_card
    with pytest.raises(SystemExit) as stopped:
        train_main(args + ["--resume", str(out)])
    assert stopped.value.code == 2
