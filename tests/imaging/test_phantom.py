import numpy as np

from livernode.imaging.phantom import make_phantom
from livernode.imaging.volume import LIVER, TUMOUR


def test_phantom_is_deterministic_per_seed():
    a = make_phantom(np.random.default_rng(3), size=64, slices=8)
    b = make_phantom(np.random.default_rng(3), size=64, slices=8)
    c = make_phantom(np.random.default_rng(4), size=64, slices=8)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.hu, c.hu)


def test_phantom_anatomy_has_realistic_hounsfield_units():
    found_tumour = False
    for seed in range(6):
        ph = make_phantom(np.random.default_rng(seed), size=128, slices=24)
        assert 1.0 <= ph.spacing[0] <= 5.0
        # field of view of a real abdomen: 0.6-0.9 mm at 512 px
        assert 0.6 * 4 <= ph.spacing[1] <= 0.9 * 4
        liver = ph.labels == LIVER
        assert liver.any()
        # parenchyma (vessels excluded by the median) sits at 55-65 HU
        assert 45 < np.median(ph.hu[liver]) < 75
        assert ph.hu.min() <= -900  # air outside the body
        assert ph.hu.max() >= 600  # bone
        assert 0 <= ph.tumour_count <= 6
        if (ph.labels == TUMOUR).any():
            found_tumour = True
            assert np.median(ph.hu[ph.labels == TUMOUR]) < np.median(ph.hu[liver]) - 10  # hypodense
    assert found_tumour
