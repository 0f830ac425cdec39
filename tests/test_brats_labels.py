"""The one definition of sequences, regions and label conventions."""

import numpy as np
import pytest

from modeling_emrfuse.brats_labels import (
    HD95_EMPTY_SENTINEL_MM,
    LABEL_CONVENTIONS,
    REGIONS,
    SEQUENCES,
    canonical_sequence_name,
    check_label_values,
    convert_label_map,
    get_label_convention,
    label_map_to_regions,
    regions_to_label_map,
)


def test_canonical_order_and_aliases():
    assert SEQUENCES == ("t1", "t1ce", "t2", "flair")
    assert REGIONS == ("WT", "TC", "ET")
    # BraTS 2023 names and 2015 folder names map onto the canonical ones
    assert [canonical_sequence_name(n) for n in ("t1n", "t1c", "t2w", "t2f")] == list(SEQUENCES)
    assert [canonical_sequence_name(n) for n in ("MR_T1", "MR_T1c", "MR_T2", "MR_Flair")] == list(SEQUENCES)
    with pytest.raises(ValueError, match="Unknown MRI sequence"):
        canonical_sequence_name("dwi")


def test_sentinel_is_the_brats_box_diagonal():
    assert HD95_EMPTY_SENTINEL_MM == pytest.approx(373.13, abs=0.01)


@pytest.mark.parametrize(
    "key, name",
    [
        ("brats2017", "brats2017"),
        ("2018", "brats2017"),
        ("BraTS2021", "brats2017"),
        ("2015", "brats2015"),
        ("2023", "brats2023"),
        ("brats2023", "brats2023"),
    ],
)
def test_convention_lookup(key, name):
    assert get_label_convention(key).name == name


def test_unknown_convention_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="Unknown label convention"):
        get_label_convention("2016")


@pytest.mark.parametrize(
    "conv, label_map, expected",
    [
        # NOTES.md: 2017-2021 WT={1,2,4}, TC={1,4}, ET={4}
        ("brats2017", [0, 1, 2, 4], [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]),
        # 2023+: WT={1,2,3}, TC={1,3}, ET={3}
        ("brats2023", [0, 1, 2, 3], [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]),
        # 2015: WT={1,2,3,4}, TC={1,3,4}, ET={4}
        ("brats2015", [0, 1, 2, 3, 4], [[0, 1, 1, 1, 1], [0, 1, 0, 1, 1], [0, 0, 0, 0, 1]]),
    ],
)
def test_region_definitions(conv, label_map, expected):
    regions = label_map_to_regions(np.array(label_map), conv)
    np.testing.assert_array_equal(regions, np.array(expected, dtype=bool))


def test_values_outside_the_convention_are_rejected():
    with pytest.raises(ValueError, match=r"label values \[3\] are outside the brats2017"):
        check_label_values(np.array([0, 1, 3]), "brats2017", where="case X seg")
    with pytest.raises(ValueError, match=r"\[4\]"):
        label_map_to_regions(np.array([0, 4]), "brats2023")


@pytest.mark.parametrize("conv", ["brats2017", "brats2023"])
def test_regions_round_trip(conv):
    rng = np.random.default_rng(0)
    labels = np.array(LABEL_CONVENTIONS[conv].valid_labels)
    label_map = rng.choice(labels, size=(7, 6, 5))
    back = regions_to_label_map(label_map_to_regions(label_map, conv), conv)
    np.testing.assert_array_equal(back, label_map)
    assert back.dtype == np.uint8


def test_convert_2017_to_2023_and_back():
    m17 = np.array([0, 1, 2, 4, 4, 2])
    m23 = convert_label_map(m17, "brats2017", "brats2023")
    np.testing.assert_array_equal(m23, [0, 1, 2, 3, 3, 2])
    np.testing.assert_array_equal(convert_label_map(m23, "2023", "2018"), m17)


def test_non_nested_predictions_are_not_dropped():
    # ET predicted where WT is not: the inner region still wins
    regions = np.zeros((3, 2), dtype=bool)
    regions[2, 0] = True
    regions[0, 1] = True
    np.testing.assert_array_equal(regions_to_label_map(regions, "brats2017"), [4, 2])
    with pytest.raises(ValueError, match="3 channels"):
        regions_to_label_map(np.zeros((2, 4)), "brats2017")
