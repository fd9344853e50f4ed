"""Procedural abdominal CT phantoms: determinism, anatomy layout in RAS, HU per phase, geometry, CLI."""
from __future__ import annotations

import numpy as np
import pytest

from CTReasonerLib.cli import main as cli_main
from CTReasonerLib.data.phantom import PhantomConfig, generate_phantom
from CTReasonerLib.data.phantom.generator import sample_grid
from CTReasonerLib.data.phantom.habitus import sample_habitus
from CTReasonerLib.errors import ConfigError
from CTReasonerLib.io.volume import ijk_to_ras_points
from CTReasonerLib.organs import ORGANS, get_organ

# Small but long enough (56 x 4.5-5 mm) to cover the diaphragm to below the kidneys.
SMALL = PhantomConfig(shape=(128, 128, 56), slice_spacing_range=(4.5, 5.0))
LAYOUT_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def small_phantoms():
    return {seed: generate_phantom(seed, SMALL) for seed in LAYOUT_SEEDS}


@pytest.fixture(scope="module")
def default_phantom():
    return generate_phantom(11)


def centroid_ras(labels, key):
    kji = np.argwhere(labels.array == get_organ(key).label)
    assert len(kji), f"{key} is missing"
    return ijk_to_ras_points(labels.ijk_to_ras, kji[:, ::-1].mean(axis=0))[0]


def spine_r(ct, labels):
    """R of the vertebral column: dense bone behind the aorta on the kidney slices."""
    aorta = centroid_ras(labels, "aorta")
    kidney_slices = np.nonzero((labels.array == get_organ("left_kidney").label).any(axis=(1, 2)))[0]
    k, j, i = np.nonzero(ct.array[kidney_slices] > 400)
    ras = ijk_to_ras_points(ct.ijk_to_ras, np.stack([i, j, kidney_slices[k]], axis=1))
    near = (np.abs(ras[:, 0] - aorta[0]) < 40) & (ras[:, 1] < aorta[1]) & (ras[:, 1] > aorta[1] - 90)
    return float(np.median(ras[near, 0]))


def test_same_seed_gives_identical_phantom(small_phantoms):
    ct, labels = generate_phantom(LAYOUT_SEEDS[0], SMALL)
    ref_ct, ref_labels = small_phantoms[LAYOUT_SEEDS[0]]
    assert np.array_equal(ct.array, ref_ct.array) and np.array_equal(labels.array, ref_labels.array)
    assert np.array_equal(ct.ijk_to_ras, ref_ct.ijk_to_ras) and np.array_equal(labels.ijk_to_ras, ct.ijk_to_ras)
    assert ct.metadata == ref_ct.metadata


def test_different_seeds_differ(small_phantoms):
    (ct0, lab0), (ct1, lab1) = small_phantoms[0], small_phantoms[1]
    assert not np.array_equal(lab0.array, lab1.array)
    assert not np.allclose(ct0.spacing, ct1.spacing)


def test_types_geometry_and_label_values(small_phantoms):
    ct, labels = small_phantoms[0]
    assert ct.array.dtype == np.int16 and labels.array.dtype == np.uint8
    assert ct.array.shape == (56, 128, 128) == labels.array.shape
    assert np.array_equal(ct.directions, np.diag([-1.0, -1.0, 1.0]))
    assert set(np.unique(labels.array)) <= set(range(15))
    assert ct.array.min() == -1024 or np.median(ct.array[:, :3, :3]) < -900   # air outside the body


@pytest.mark.parametrize("seed", LAYOUT_SEEDS)
def test_all_organs_present_in_plausible_layout(small_phantoms, seed):
    ct, labels = small_phantoms[seed]
    c = {o.key: centroid_ras(labels, o.key) for o in ORGANS}     # asserts every organ is present
    R, A, S = 0, 1, 2
    spine = spine_r(ct, labels)
    assert c["liver"][R] > c["spleen"][R] + 100                      # liver on the right, spleen on the left
    assert c["spleen"][A] < c["stomach"][A]                           # spleen posterior
    assert c["aorta"][R] < c["inferior_vena_cava"][R]                 # aorta left of the IVC
    assert c["aorta"][R] < spine < c["inferior_vena_cava"][R]
    assert c["right_kidney"][R] > spine + 30 and c["left_kidney"][R] < spine - 30
    for side in ("right", "left"):
        adrenal, kidney = c[f"{side}_adrenal_gland"], c[f"{side}_kidney"]
        assert adrenal[S] > kidney[S] + 15, side
        assert abs(adrenal[R] - spine) < abs(kidney[R] - spine), side
    assert c["gallbladder"][S] < c["liver"][S] and c["gallbladder"][R] > spine
    pancreas = np.argwhere(labels.array == get_organ("pancreas").label)[:, ::-1]
    pancreas_r = ijk_to_ras_points(labels.ijk_to_ras, pancreas)[:, R]
    assert pancreas_r.min() < c["aorta"][R] < pancreas_r.max()        # pancreas crosses the aorta
    assert c["portal_splenic_veins"][R] > c["pancreas"][R] - 40
    assert c["stomach"][R] < spine and c["stomach"][S] > c["left_kidney"][S] + 30   # left upper
    assert c["duodenum"][S] < c["stomach"][S]
    assert max(c, key=lambda key: c[key][S]) == "esophagus"           # entering from above


def test_median_hu_follows_the_contrast_phase():
    medians = {}
    for phase in ("non_contrast", "arterial", "portal_venous"):
        ct, labels = generate_phantom(5, PhantomConfig(shape=(96, 96, 40), slice_spacing_range=(6.0, 6.5),
                                                       contrast_phases=(phase,)))
        assert ct.metadata["contrast_phase"] == phase
        medians[phase] = {o.key: float(np.median(ct.array[labels.array == o.label])) for o in ORGANS
                          if (labels.array == o.label).any()}
    nc, art, pv = medians["non_contrast"], medians["arterial"], medians["portal_venous"]
    assert 25 < nc["aorta"] < 70 and art["aorta"] > 230 and 110 < pv["aorta"] < 230
    assert 40 < nc["liver"] < 200 and pv["liver"] > nc["liver"] + 30
    assert art["right_kidney"] > nc["right_kidney"] + 80
    assert pv["portal_splenic_veins"] > pv["liver"]
    assert all(-30 < m[key] < 40 for m in (nc, art, pv) for key in ("gallbladder",))
    for m in (nc, art, pv):
        for organ in ("spleen", "liver", "pancreas", "right_adrenal_gland", "left_adrenal_gland"):
            assert 20 < m[organ] < 200, organ


def test_spacing_and_field_of_view_ranges():
    config = PhantomConfig()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        grid = sample_grid(rng, config, sample_habitus(rng, config))
        fov = grid.spacing[0] * 256
        assert 330 <= fov <= 420 and grid.spacing[0] == grid.spacing[1]
        assert 0.6 <= fov / 512 <= 1.0              # the pixel size of a clinical 512^2 reconstruction
        assert 2.5 <= grid.spacing[2] <= 5.0
    ct, _ = generate_phantom(3, PhantomConfig(shape=(64, 64, 16), in_plane_spacing_range=(0.6, 1.0)))
    assert 0.6 <= ct.spacing[0] <= 1.0 and 2.5 <= ct.spacing[2] <= 5.0


def test_default_phantom_organs_and_slices(default_phantom):
    ct, labels = default_phantom
    assert ct.array.shape == (96, 256, 256)
    areas = {o.key: (labels.array == o.label).sum(axis=(1, 2)) for o in ORGANS}
    for key, area in areas.items():
        assert area.max() > 0, key
    for key in ("right_adrenal_gland", "left_adrenal_gland", "esophagus", "gallbladder", "portal_splenic_veins"):
        assert areas[key].max() >= 40, f"{key} peaks at {areas[key].max()} pixels"
    for key in ("gallbladder", "right_kidney", "left_kidney", "right_adrenal_gland", "esophagus", "spleen"):
        assert (areas[key] == 0).any() and (areas[key] > 0).any(), key   # present on some slices only
    in_body = ct.array > -500
    assert 0.3 < in_body.mean() < 0.85


def test_coverage_cuts_organs_when_short():
    _, labels = generate_phantom(2, PhantomConfig(shape=(64, 64, 12), slice_spacing_range=(2.5, 2.5)))
    present = {o.key for o in ORGANS if (labels.array == o.label).any()}
    assert 0 < len(present) < len(ORGANS)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="shape"):
        generate_phantom(0, PhantomConfig(shape=(4, 64, 64)))
    with pytest.raises(ConfigError, match="contrast phase"):
        generate_phantom(0, PhantomConfig(contrast_phases=("delayed",)))


def test_cli_writes_readable_ct_and_labels(tmp_path, capsys):
    from CTReasonerLib.io.readers import read_labelmap, read_volume

    assert cli_main(["phantom", "--seed", "7", "--count", "2", "--size", "64", "64", "20",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for seed in (7, 8):
        ct_path, label_path = tmp_path / f"phantom_{seed:04d}_ct.nii.gz", tmp_path / f"phantom_{seed:04d}_labels.nii.gz"
        assert str(ct_path) in out and str(label_path) in out
        ct, labels = read_volume(ct_path), read_labelmap(label_path)
        ref_ct, ref_labels = generate_phantom(seed, PhantomConfig(shape=(64, 64, 20)))
        assert np.array_equal(ct.array, ref_ct.array) and np.array_equal(labels.array, ref_labels.array)
        assert np.allclose(ct.ijk_to_ras, ref_ct.ijk_to_ras, atol=1e-3)
        assert np.allclose(labels.ijk_to_ras, ref_ct.ijk_to_ras, atol=1e-3)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert cli_main(["phantom", "--seed", "1", "--count", "0", "--out", str(tmp_path)]) == 2
    assert "--count" in capsys.readouterr().err
