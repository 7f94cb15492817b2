"""Weighted Kabsch, quaternion SLERP and rigid fusion (unimo_bids.unimo.rotations).

Kabsch is checked against a brute-force minimisation over rotation vectors, including the
reflection cases the public UniMo code gets wrong; SLERP at lambda = 0 / 1, for identical,
antipodal and nearly parallel quaternions, values and gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import roma
import torch
from scipy.optimize import minimize
from scipy.spatial.transform import Rotation

from unimo_bids.unimo.rotations import (
    bounded_weight,
    bounded_weight_inverse,
    fuse_rigid,
    slerp,
    weighted_kabsch,
)

METHODS = ("svd", "horn")


def kabsch_cost(R, t, source, target, weights):
    """sum_k w_k ||R s_k + t - y_k||^2 for numpy arrays (3, 3), (3,), (K, 3), (K, 3), (K,)."""
    residual = source @ R.T + t - target
    return float((weights * (residual**2).sum(-1)).sum())


def brute_force(source, target, weights, starts=24, seed=0):
    """Best rotation over many BFGS runs from random rotation vectors (translation in closed form:
    for a given R the optimal t is the weighted mean of y - R s). Returns (cost, R)."""
    w = weights / weights.sum()
    s_mean, y_mean = w @ source, w @ target

    def cost(rotvec):
        R = Rotation.from_rotvec(rotvec).as_matrix()
        return kabsch_cost(R, y_mean - R @ s_mean, source, target, weights)

    rng = np.random.default_rng(seed)
    best = None
    for start in Rotation.random(starts, random_state=rng).as_rotvec():
        result = minimize(cost, start, method="BFGS", options={"gtol": 1e-12})
        if best is None or result.fun < best.fun:
            best = result
    return best.fun, Rotation.from_rotvec(best.x).as_matrix()


def naive_svd(source, target, weights, fix=None):
    """Textbook SVD solution R = V U^T of H = sum w s y^T (numpy), optionally 'fixed' by negating
    the last column of V (correct) or the last row of V U^T (the public UniMo code's bug)."""
    w = weights / weights.sum()
    s = source - w @ source
    y = target - w @ target
    U, _, Vt = np.linalg.svd((w[:, None] * s).T @ y)
    V = Vt.T
    d = np.sign(np.linalg.det(V @ U.T))
    if fix == "column":
        V = V.copy()
        V[:, -1] *= d
    R = V @ U.T
    if fix == "row":
        R = R.copy()
        R[-1, :] *= d
    return R


def to_numpy(*tensors):
    return [t.detach().cpu().numpy() for t in tensors]


# ------------------------------------------------------------------------------------------------
# Kabsch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_kabsch_matches_brute_force_on_random_weighted_sets(method):
    gen = torch.Generator().manual_seed(3)
    source = torch.randn(4, 9, 3, generator=gen, dtype=torch.float64) * 20
    target = torch.randn(4, 9, 3, generator=gen, dtype=torch.float64) * 20  # unrelated: hard case
    weights = torch.rand(4, 9, generator=gen, dtype=torch.float64) + 0.05
    R, t = weighted_kabsch(source, target, weights, method=method)
    for b in range(4):
        s, y, w, Rb, tb = to_numpy(source[b], target[b], weights[b], R[b], t[b])
        ours = kabsch_cost(Rb, tb, s, y, w)
        best, R_best = brute_force(s, y, w)
        assert ours <= best * (1 + 1e-9) + 1e-9
        assert np.abs(Rb - R_best).max() < 1e-4  # generic sets have a unique optimum
        assert np.linalg.det(Rb) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_kabsch_mirrored_set_gives_optimal_proper_rotation(method):
    """A mirror image of a 3D set: plain SVD returns a reflection (det -1). The answer must be the
    best proper rotation, which the column fix gives and the row fix does not."""
    rng = np.random.default_rng(7)
    source = rng.normal(size=(12, 3)) * [30.0, 20.0, 10.0]
    mirror = np.diag([1.0, 1.0, -1.0])
    rot = Rotation.random(random_state=rng).as_matrix()
    target = source @ (rot @ mirror).T + [5.0, -3.0, 8.0] + rng.normal(size=(12, 3)) * 0.5
    weights = rng.uniform(0.2, 1.0, size=12)
    assert np.linalg.det(naive_svd(source, target, weights)) < 0  # really a reflection case

    R, t = weighted_kabsch(torch.as_tensor(source)[None], torch.as_tensor(target)[None],
                           torch.as_tensor(weights)[None], method=method)
    Rn, tn = to_numpy(R[0], t[0])
    assert np.linalg.det(Rn) == pytest.approx(1.0, abs=1e-12)
    ours = kabsch_cost(Rn, tn, source, target, weights)
    best, R_best = brute_force(source, target, weights)
    assert ours <= best * (1 + 1e-9) + 1e-9
    assert np.abs(Rn - R_best).max() < 1e-4

    w = weights / weights.sum()
    for fix, optimal in (("column", True), ("row", False)):
        R_fix = naive_svd(source, target, weights, fix)
        cost = kabsch_cost(R_fix, w @ target - R_fix @ (w @ source), source, target, weights)
        assert (abs(cost - best) < 1e-6 * best) == optimal, fix


@pytest.mark.parametrize("method", METHODS)
def test_kabsch_planar_mirrored_set_is_fitted_exactly(method):
    """A planar set and its mirror image differ by a proper rotation (a half-turn about a line in
    the plane): the fit must be exact, with det +1, although H has a zero singular value."""
    rng = np.random.default_rng(11)
    source = np.column_stack([rng.normal(size=(10, 2)) * 25.0, np.zeros(10)])
    rot = Rotation.random(random_state=rng).as_matrix()
    target = (source * [1.0, -1.0, 1.0]) @ rot.T + [1.0, 2.0, 3.0]
    R, t = weighted_kabsch(torch.as_tensor(source)[None], torch.as_tensor(target)[None],
                           method=method)
    Rn, tn = to_numpy(R[0], t[0])
    assert np.linalg.det(Rn) == pytest.approx(1.0, abs=1e-12)
    assert kabsch_cost(Rn, tn, source, target, np.ones(10)) < 1e-16 * 1e6


@pytest.mark.parametrize("method", METHODS)
def test_kabsch_recovers_known_rigid_transform(method):
    gen = torch.Generator().manual_seed(0)
    rotation = roma.random_rotmat(5, dtype=torch.float64, generator=gen)
    translation = torch.randn(5, 3, generator=gen, dtype=torch.float64) * 30
    source = torch.randn(5, 16, 3, generator=gen, dtype=torch.float64) * 40
    target = source @ rotation.transpose(1, 2) + translation[:, None]
    weights = torch.rand(5, 16, generator=gen, dtype=torch.float64)
    # Zero-weight outliers must not matter.
    target[:, :3] += 100.0
    weights[:, :3] = 0.0
    R, t = weighted_kabsch(source.float(), target.float(), weights.float(), method=method)
    assert R.dtype == torch.float64 and t.dtype == torch.float64
    # float32 inputs: exact up to their rounding (about 1e-5 mm on 100 mm).
    assert torch.allclose(R, rotation, atol=1e-6)
    assert torch.allclose(t, translation, atol=1e-4)
    R, t = weighted_kabsch(source, target, weights, method=method)
    assert torch.allclose(R, rotation, atol=1e-12)
    assert torch.allclose(t, translation, atol=1e-10)


def test_kabsch_all_zero_weights_fall_back_to_uniform():
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    target = source + 1.0
    R, t = weighted_kabsch(source, target, torch.zeros(2, 6, dtype=torch.float64))
    assert torch.allclose(R, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), atol=1e-12)
    assert torch.allclose(t, torch.ones(2, 3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_kabsch_gradients_finite_including_degenerate_sets(method):
    gen = torch.Generator().manual_seed(2)
    generic = torch.randn(8, 3, generator=gen, dtype=torch.float64) * 10
    planar = generic * torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    line = torch.randn(8, 1, generator=gen, dtype=torch.float64) * torch.tensor([[1.0, 2.0, 3.0]])
    point = torch.zeros(8, 3, dtype=torch.float64)
    source = torch.stack([generic, planar, line, point, generic])
    rotation = roma.random_rotmat(5, dtype=torch.float64, generator=gen)
    target = source @ rotation.transpose(1, 2)
    target[4] = -target[4]  # a mirror image
    source.requires_grad_(True)
    target.requires_grad_(True)
    weights = torch.rand(5, 8, generator=gen, dtype=torch.float64).requires_grad_(True)
    R, t = weighted_kabsch(source, target, weights, method=method)
    probe = torch.randn(5, 3, 3, generator=gen, dtype=torch.float64)
    ((R * probe).sum() + t.square().sum()).backward()
    for tensor in (source, target, weights):
        assert torch.isfinite(tensor.grad).all()
    assert torch.isfinite(R).all() and torch.isfinite(t).all()
    dets = torch.det(R)
    assert torch.allclose(dets, torch.ones_like(dets), atol=1e-12)

    # Where the solution is unique the gradient is the true one.
    def loss(s, y, w):
        R, t = weighted_kabsch(s[None], y[None], w[None], method=method)
        return (R * probe[0]).sum() + t.square().sum()

    y = (generic @ rotation[0].T + torch.randn(8, 3, generator=gen, dtype=torch.float64))
    w = torch.rand(8, generator=gen, dtype=torch.float64) + 0.1
    assert torch.autograd.gradcheck(loss, (generic.clone().requires_grad_(), y.requires_grad_(),
                                           w.requires_grad_()))


# ------------------------------------------------------------------------------------------------
# SLERP
# ------------------------------------------------------------------------------------------------


def angle(q1, q2):
    """Rotation angle (rad) between unit quaternions (..., 4), sign-insensitive."""
    return 2 * torch.acos((q1 * q2).sum(-1).abs().clamp(max=1.0))


def same_rotation(q1, q2, atol=1e-12):
    return torch.allclose((q1 * q2).sum(-1).abs(), torch.ones(q1.shape[:-1], dtype=q1.dtype),
                          atol=atol)


def test_slerp_endpoints_and_batched_weights():
    gen = torch.Generator().manual_seed(0)
    q1 = roma.random_unitquat(6, dtype=torch.float64, generator=gen)
    q2 = roma.random_unitquat(6, dtype=torch.float64, generator=gen)
    assert torch.allclose(slerp(q1, q2, 0.0), q1, atol=1e-14)
    assert same_rotation(slerp(q1, q2, 1.0), q2)
    lam = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    out = slerp(q1, q2, lam)
    assert out.shape == (6, 4)
    assert torch.allclose(out.norm(dim=-1), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(out[0], q1[0], atol=1e-14) and same_rotation(out[1:2], q2[1:2])
    # Each pair with its own weight equals roma's SLERP of that pair alone (shortest arc).
    for b in range(6):
        ref = roma.unitquat_slerp(q1[b:b + 1], q2[b:b + 1], lam[b:b + 1], shortest_arc=True)[0]
        assert same_rotation(out[b:b + 1], ref, atol=1e-12)


def test_slerp_angle_is_proportional_to_weight():
    gen = torch.Generator().manual_seed(1)
    q1 = roma.random_unitquat(5, dtype=torch.float64, generator=gen)
    q2 = roma.random_unitquat(5, dtype=torch.float64, generator=gen)
    total = angle(q1, q2)
    for lam in (0.1, 0.5, 0.8):
        out = slerp(q1, q2, lam)
        assert torch.allclose(angle(q1, out), lam * total, atol=1e-10)
        assert torch.allclose(angle(out, q2), (1 - lam) * total, atol=1e-10)


def test_slerp_takes_the_shortest_arc():
    """q2 and -q2 are the same rotation and must give the same path."""
    gen = torch.Generator().manual_seed(2)
    q1 = roma.random_unitquat(4, dtype=torch.float64, generator=gen)
    q2 = roma.random_unitquat(4, dtype=torch.float64, generator=gen)
    assert ((q1 * q2).sum(-1) < 0).any() and ((q1 * q2).sum(-1) > 0).any()
    for lam in (0.3, 0.7):
        assert same_rotation(slerp(q1, q2, lam), slerp(q1, -q2, lam))
        # Along the shortest arc the rotation angle covered is lam * (at most pi).
        assert (angle(q1, slerp(q1, q2, lam)) <= lam * np.pi + 1e-12).all()


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_slerp_edge_cases_no_nan_in_values_or_gradients(dtype):
    gen = torch.Generator().manual_seed(3)
    q = roma.random_unitquat(3, dtype=torch.float64, generator=gen)
    tiny = roma.rotvec_to_unitquat(torch.tensor([1e-9, 0.0, 0.0], dtype=torch.float64))
    half_turn = roma.quat_product(q[2], roma.rotvec_to_unitquat(
        torch.tensor([np.pi, 0.0, 0.0], dtype=torch.float64)))  # <q1, q2> = 0 exactly-ish
    cases = [
        (q[0], q[0]),  # identical
        (q[0], -q[0]),  # antipodal: the same rotation
        (q[1], roma.quat_product(q[1], tiny)),  # nearly parallel
        (q[2], half_turn),  # orthogonal quaternions: a 180 degree rotation apart
    ]
    for lam_value in (0.0, 1.0, 0.5):
        q1 = torch.stack([a for a, _ in cases]).to(dtype).requires_grad_(True)
        q2 = torch.stack([b for _, b in cases]).to(dtype).requires_grad_(True)
        lam = torch.full((len(cases),), lam_value, dtype=dtype, requires_grad=True)
        out = slerp(q1, q2, lam)
        out.pow(3).sum().backward()
        assert torch.isfinite(out).all()
        for tensor in (q1, q2, lam):
            assert torch.isfinite(tensor.grad).all(), (lam_value, tensor.grad)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert same_rotation(out[0:1].double(), q[0:1], atol=tol)  # identical -> itself
        assert same_rotation(out[1:2].double(), q[0:1], atol=tol)  # antipodal -> itself


def test_slerp_gradcheck():
    gen = torch.Generator().manual_seed(4)
    q1 = roma.random_unitquat(3, dtype=torch.float64, generator=gen).requires_grad_(True)
    q2 = roma.random_unitquat(3, dtype=torch.float64, generator=gen).requires_grad_(True)
    lam = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(slerp, (q1, q2, lam))
    # Identical inputs take the lerp branch, whose derivative matches SLERP's to first order.
    same = q1.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: slerp(a, b, 0.3), (same, q1.detach().clone()
                                                                      .requires_grad_(True)))


# ------------------------------------------------------------------------------------------------
# Fusion and lambda
# ------------------------------------------------------------------------------------------------


def random_rigid(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    R = roma.random_rotmat(batch, dtype=torch.float64, generator=gen)
    t = torch.randn(batch, 3, generator=gen, dtype=torch.float64) * 10
    return R, t


def test_fuse_rigid_endpoints_and_identical_inputs():
    R_i, t_i = random_rigid(4, 0)
    R_s, t_s = random_rigid(4, 1)
    center = torch.tensor([2.0, -18.0, 20.0], dtype=torch.float64)
    image = fuse_rigid(R_i, t_i, R_s, t_s, 0.0, center)
    shape = fuse_rigid(R_i, t_i, R_s, t_s, torch.ones(4, dtype=torch.float64), center)
    assert torch.allclose(image[:, :3, :3], R_i, atol=1e-12)
    assert torch.allclose(image[:, :3, 3], t_i, atol=1e-10)
    assert torch.allclose(shape[:, :3, :3], R_s, atol=1e-12)
    assert torch.allclose(shape[:, :3, 3], t_s, atol=1e-10)
    assert torch.allclose(image[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64))
    same = fuse_rigid(R_i, t_i, R_i, t_i, torch.rand(4, dtype=torch.float64),
                      center.expand(4, 3))
    assert torch.allclose(same[:, :3, :3], R_i, atol=1e-12)
    assert torch.allclose(same[:, :3, 3], t_i, atol=1e-10)


def test_fuse_rigid_keeps_the_image_branch_where_the_branches_disagree():
    """With ``max_angle``, a shape estimate turned 170 degrees from the image's (a mask flipped
    about an axis of symmetry) is not fused: the image estimate comes back, exactly. One 20
    degrees away is fused as without the gate, and the gradient still reaches lambda."""
    R_i, t_i = random_rigid(2, 4)
    turn = roma.rotvec_to_rotmat(torch.tensor([[0.0, 0, math.radians(170)],
                                               [0.0, math.radians(20), 0]], dtype=torch.float64))
    R_s, t_s = R_i @ turn, t_i + torch.tensor([5.0, -3, 2], dtype=torch.float64)
    center = torch.tensor([2.0, -18.0, 20.0], dtype=torch.float64)
    lam = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    gated = fuse_rigid(R_i, t_i, R_s, t_s, lam, center, max_angle=math.radians(45))
    plain = fuse_rigid(R_i, t_i, R_s, t_s, lam, center)
    assert torch.equal(gated[0, :3, :3], R_i[0]) and torch.equal(gated[0, :3, 3], t_i[0])
    assert not torch.allclose(plain[0], gated[0], atol=1e-3)
    assert torch.allclose(gated[1], plain[1], atol=1e-12)
    gated[1].sum().backward()
    assert lam.grad is not None and torch.isfinite(lam.grad) and lam.grad != 0


def test_fuse_rigid_interpolates_about_the_centre():
    R_i, t_i = random_rigid(3, 2)
    R_s, t_s = random_rigid(3, 3)
    center = torch.tensor([[0.0, 0, 0], [10.0, 20, 30], [-5.0, 40, 2]], dtype=torch.float64)
    lam = torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64)
    fused = fuse_rigid(R_i, t_i, R_s, t_s, lam, center)
    q = slerp(roma.rotmat_to_unitquat(R_i), roma.rotmat_to_unitquat(R_s), lam)
    assert torch.allclose(fused[:, :3, :3], roma.unitquat_to_rotmat(q), atol=1e-12)

    def moved_centre(R, t):
        return torch.einsum("bij,bj->bi", R, center) + t

    expected = (1 - lam[:, None]) * moved_centre(R_i, t_i) + lam[:, None] * moved_centre(R_s, t_s)
    assert torch.allclose(moved_centre(fused[:, :3, :3], fused[:, :3, 3]), expected, atol=1e-10)
    # Two rotations about the centre fuse into a rotation about the centre.
    pure_i = center - torch.einsum("bij,bj->bi", R_i, center)
    pure_s = center - torch.einsum("bij,bj->bi", R_s, center)
    fused = fuse_rigid(R_i, pure_i, R_s, pure_s, lam, center)
    assert torch.allclose(moved_centre(fused[:, :3, :3], fused[:, :3, 3]), center, atol=1e-10)


def test_bounded_weight_and_gradient_through_fusion():
    raw = torch.tensor([-100.0, -3.0, 0.0, 3.0, 100.0], requires_grad=True)
    lam = bounded_weight(raw)
    assert ((lam >= 0) & (lam <= 1)).all() and lam[2] == 0.5
    assert torch.allclose(bounded_weight(bounded_weight_inverse(torch.tensor([0.1, 0.7]))),
                          torch.tensor([0.1, 0.7]))
    R_i, t_i = random_rigid(5, 4)
    R_s, t_s = random_rigid(5, 5)
    fused = fuse_rigid(R_i, t_i, R_s, t_s, lam, torch.zeros(3))
    fused.sum().backward()
    assert torch.isfinite(raw.grad).all() and raw.grad[1:4].abs().min() > 0
