"""Per-volume scipy work in threads (unimo_bids.unimo.parallel): groups and results."""

from __future__ import annotations

import numpy as np
import pytest

from unimo_bids.unimo.geometry import voxel_sizes
from unimo_bids.unimo.parallel import run_on_groups, volume_groups
from unimo_bids.unimo.segment import brain_mask
from unimo_bids.unimo.shape import signed_distance


def test_volume_groups_cover_every_volume_once():
    for count, workers, most in [(10, 3, None), (10, 3, 2), (2, 4, None), (1, 1, 5), (7, 2, 1)]:
        groups = volume_groups(count, workers, most)
        covered = np.concatenate([np.arange(g.start, g.stop) for g in groups])
        assert covered.tolist() == list(range(count))
        assert len(groups) >= min(workers, count)
        if most is not None:
            assert max(g.stop - g.start for g in groups) <= most
    assert volume_groups(0, 2) == []


def test_an_error_in_a_thread_is_raised():
    def fail(group):
        if group.start > 0:
            raise ValueError("group failed")

    with pytest.raises(ValueError, match="group failed"):
        run_on_groups(fail, 6, workers=3)


def test_masks_and_maps_do_not_depend_on_the_thread_count(mni_template):
    """Real brain volumes (the template, shifted and scaled per volume): the classical masks and
    their signed distance maps are the same in one thread and in three."""
    data, affine = mni_template
    volume = data[::2, ::2, ::2].astype(np.float32)
    volumes = np.stack([np.roll(volume, shift, axis=0) * (1 + 0.1 * shift)
                        for shift in range(5)])
    sizes = voxel_sizes(affine) * 2
    one = brain_mask(volumes, sizes, workers=1)
    three = brain_mask(volumes, sizes, workers=3)
    np.testing.assert_array_equal(one, three)
    assert one.any(axis=(1, 2, 3)).all()
    np.testing.assert_array_equal(signed_distance(one, sizes, workers=1),
                                  signed_distance(one, sizes, workers=3))
