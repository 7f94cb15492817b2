"""Rotations for UniMo: weighted Kabsch, quaternion SLERP and image/shape rigid fusion.

Conventions (see ``geometry``): a rigid transform maps a reference world point (RAS mm) to the
moving world point holding the same anatomy, ``y = R x + t``. Quaternions are unit quaternions
in roma's XYZW order (vector part first, scalar last): the identity is (0, 0, 0, 1), and q and -q
are the same rotation.

The public UniMo code fixes Kabsch reflections on the wrong axis and its SLERP breaks at
lambda = 0/1 and for (anti)parallel inputs; the functions below are built on roma's solvers and
are tested against brute force and at those edge cases (tests/test_rotations.py).
"""

from __future__ import annotations

import torch
import roma

from .geometry import homogeneous

__all__ = [
    "weighted_kabsch",
    "slerp",
    "fuse_rigid",
    "bounded_weight",
    "bounded_weight_inverse",
]


def weighted_kabsch(
    source: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    method: str = "auto",
    gradient_eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigid (R, t) minimising sum_k w_k ||R s_k + t - y_k||^2, differentiable.

    source, target: (B, K, 3) corresponding points (s_k -> y_k).
    weights: (B, K) non-negative, or None for uniform. Negative weights count as 0; a row whose
        weights are all 0 falls back to uniform weights rather than dividing by 0.
    method: roma's solver, ``"svd"`` (R = V diag(1, 1, sign det(V U^T)) U^T with H = U S V^T the
        weighted cross-covariance sum_k w_k s_k y_k^T: the sign fix is on the last singular
        vector, the one of the smallest singular value), ``"horn"`` (closed-form quaternion, Horn
        1987) or ``"auto"`` (Horn for 3x3 in float64). Both are optimal among proper rotations,
        reflections included.
    gradient_eps: damping of the backward pass where the rotation is not unique (coplanar,
        collinear or coincident points): 1/(s_i + s_j) becomes a damped pseudo-inverse.
    Returns R (B, 3, 3) with det +1 and t (B, 3), both float64 (solved in float64).
    """
    source = source.to(torch.float64)
    target = target.to(torch.float64)
    if weights is None:
        weights = torch.ones(source.shape[:-1], dtype=torch.float64, device=source.device)
    weights = weights.to(torch.float64).clamp_min(0.0)
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total > 0, weights, torch.ones_like(weights))
    weights = weights / weights.sum(-1, keepdim=True)

    source_mean = torch.einsum("bk,bki->bi", weights, source)
    target_mean = torch.einsum("bk,bki->bi", weights, target)
    # roma maximises tr(R^T M) with M = sum w y s^T (= H^T): R = U_M diag(1, 1, d) V_M^T.
    cross = torch.einsum("bk,bki,bkj->bij", weights, target - target_mean[:, None],
                         source - source_mean[:, None])
    # Older roma releases have no ``method`` (SVD only): pass it only when asked for.
    options = {} if method == "auto" else {"method": method}
    rotation = roma.special_procrustes(cross, gradient_eps=gradient_eps, **options)
    translation = target_mean - torch.einsum("bij,bj->bi", rotation, source_mean)
    return rotation, translation


def slerp(q1: torch.Tensor, q2: torch.Tensor, lam) -> torch.Tensor:
    """Shortest-arc spherical interpolation of unit quaternions, one weight per pair.

    q1, q2: (B, 4) XYZW quaternions (normalised here). lam: (B,) tensor or scalar; 0 gives q1,
    1 gives q2 (up to sign), values outside [0, 1] extrapolate along the same arc.
    q2 is flipped to q1's hemisphere when <q1, q2> < 0 (q and -q are the same rotation), so the
    path is the shortest rotation. Nearly parallel pairs (including identical and antipodal ones)
    use normalised linear interpolation, which equals SLERP to machine precision there and keeps
    values and gradients finite. Returns (B, 4) unit quaternions.

    roma.unitquat_slerp takes a vector of steps applied to every pair (an outer product, B x A);
    this takes one weight per pair, as the fusion needs.
    """
    q1 = q1 / q1.norm(dim=-1, keepdim=True)
    q2 = q2 / q2.norm(dim=-1, keepdim=True)
    lam = torch.as_tensor(lam, dtype=q1.dtype, device=q1.device)
    lam = lam.reshape(-1, 1) if lam.dim() > 0 else lam

    dot = (q1 * q2).sum(-1, keepdim=True)
    sign = torch.where(dot < 0, -torch.ones_like(dot), torch.ones_like(dot))
    q2 = q2 * sign
    cos = dot * sign
    # sin(omega) as the norm of q2's component orthogonal to q1: accurate at small angles, where
    # acos(cos) is not. Its norm has no gradient at 0, so nearby pairs read a safe dummy instead.
    rejection = q2 - cos * q1
    threshold = torch.finfo(q1.dtype).eps ** 0.5
    nearby = (rejection * rejection).sum(-1, keepdim=True) < threshold ** 2
    sin = torch.where(nearby, torch.ones_like(cos),
                      torch.where(nearby, torch.ones_like(rejection), rejection).norm(
                          dim=-1, keepdim=True))
    omega = torch.atan2(sin, cos)
    alpha = torch.where(nearby, 1.0 - lam, torch.sin((1.0 - lam) * omega) / sin)
    beta = torch.where(nearby, lam * torch.ones_like(cos), torch.sin(lam * omega) / sin)
    out = alpha * q1 + beta * q2
    return out / out.norm(dim=-1, keepdim=True)


def fuse_rigid(
    R_image: torch.Tensor,
    t_image: torch.Tensor,
    R_shape: torch.Tensor,
    t_shape: torch.Tensor,
    lam,
    center,
    max_angle: float | None = None,
) -> torch.Tensor:
    """UniMo fusion of the image-branch and shape-branch rigid estimates.

    R_image, R_shape: (B, 3, 3); t_image, t_shape: (B, 3) (y = R x + t, world mm).
    lam: (B,) tensor or scalar weight of the shape branch: 0 gives the image estimate, 1 the
        shape estimate (see ``bounded_weight``).
    center: (3,) or (B, 3) world mm, e.g. the brain centroid of the reference.
    The rotation is the SLERP of the two quaternions; the translation interpolates where each
    branch sends the centre, x -> R (x - c) + c + d with d = (1 - lam) d_image + lam d_shape,
    so both parts are interpolated about the same point and a pure rotation about c stays one.
    max_angle: optional radians; where the two rotations are further apart, the image estimate
        is returned instead (a SLERP halfway between two rotations 180 degrees apart estimates
        neither of them).
    Returns (B, 4, 4) float64 transforms, reference world -> moving world.
    """
    dtype = torch.float64
    R_image, R_shape = R_image.to(dtype), R_shape.to(dtype)
    t_image, t_shape = t_image.to(dtype), t_shape.to(dtype)
    center = torch.as_tensor(center, dtype=dtype, device=R_image.device).expand_as(t_image)
    lam = torch.as_tensor(lam, dtype=dtype, device=R_image.device)
    lam_col = lam.reshape(-1, 1) if lam.dim() > 0 else lam

    quat = slerp(roma.rotmat_to_unitquat(R_image), roma.rotmat_to_unitquat(R_shape), lam)
    rotation = roma.unitquat_to_rotmat(quat)

    def shift(R, t):  # displacement of the centre, R c + t - c
        return torch.einsum("bij,bj->bi", R, center) + t - center

    displacement = (1.0 - lam_col) * shift(R_image, t_image) + lam_col * shift(R_shape, t_shape)
    translation = center + displacement - torch.einsum("bij,bj->bi", rotation, center)
    fused = homogeneous(rotation, translation)
    if max_angle is None:
        return fused
    apart = roma.rotmat_geodesic_distance(R_image, R_shape) > max_angle
    return torch.where(apart[:, None, None], homogeneous(R_image, t_image), fused)


def bounded_weight(raw: torch.Tensor) -> torch.Tensor:
    """Learned fusion weight lambda in (0, 1) from an unbounded parameter (sigmoid)."""
    return torch.sigmoid(raw)


def bounded_weight_inverse(lam) -> torch.Tensor:
    """Raw parameter giving ``bounded_weight(raw) == lam`` (logit), to initialise lambda."""
    lam = torch.as_tensor(lam, dtype=torch.get_default_dtype())
    return torch.logit(lam)
