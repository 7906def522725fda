"""The organ vocabulary against the class map shipped in the package and TotalSegmentator's published ids."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from ctglip_jax.data import organs

SHIPPED = pathlib.Path(organs.__file__).parent / "resources" / "totalsegmentator_classes.json"
SHARED_REFERENCE = (
    pathlib.Path(__file__).resolve().parents[2] / "shared/reference/totalsegmentator_classes.json"
)

# A few v1 ids as published in TotalSegmentator's class map (typed here from its README, not from our file).
KNOWN_V1_IDS = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "aorta",
    8: "inferior_vena_cava",
    9: "portal_vein_and_splenic_vein",
    10: "pancreas",
    11: "adrenal_gland_right",
    12: "adrenal_gland_left",
    13: "lung_upper_lobe_left",
    17: "lung_lower_lobe_right",
    18: "vertebrae_L5",
    22: "vertebrae_L1",
    41: "vertebrae_C1",
    42: "esophagus",
    43: "trachea",
    44: "heart_myocardium",
    49: "pulmonary_artery",
    50: "brain",
    57: "colon",
    58: "rib_left_1",
    81: "rib_right_12",
    92: "sacrum",
    93: "face",
    104: "urinary_bladder",
}


@pytest.fixture(scope="module")
def shipped():
    return json.loads(SHIPPED.read_text())


def test_v1_names_match_shipped_json(shipped):
    names = organs.v1_names()
    assert names == {int(k): v for k, v in shipped["total_v1"].items()}
    assert sorted(names) == list(range(1, 105))
    assert len(set(names.values())) == 104 == organs.NUM_CLASSES
    assert organs.v1_ids() == {v: k for k, v in names.items()}


def test_v1_ids_match_published_ids():
    for i, name in KNOWN_V1_IDS.items():
        assert organs.v1_names()[i] == name
        assert organs.organ_id(name) == i


@pytest.mark.skipif(not SHARED_REFERENCE.exists(), reason="shared reference only present in the dev checkout")
def test_shipped_json_is_the_reference_copy():
    assert SHIPPED.read_bytes() == SHARED_REFERENCE.read_bytes()


def test_unknown_name_raises_keyerror_naming_it():
    with pytest.raises(KeyError, match="not_an_organ"):
        organs.organ_id("not_an_organ")


@pytest.mark.parametrize(
    "name, readable",
    [
        ("kidney_left", "left kidney"),
        ("adrenal_gland_right", "right adrenal gland"),
        ("lung_upper_lobe_left", "left upper lung lobe"),
        ("lung_middle_lobe_right", "right middle lung lobe"),
        ("vertebrae_L2", "L2 vertebra"),
        ("vertebrae_C1", "C1 vertebra"),
        ("rib_left_1", "left 1st rib"),
        ("rib_right_3", "right 3rd rib"),
        ("rib_left_11", "left 11th rib"),
        ("heart_atrium_left", "left atrium"),
        ("heart_ventricle_right", "right ventricle"),
        ("heart_myocardium", "myocardium"),
        ("clavicula_right", "right clavicle"),
        ("iliac_vena_left", "left iliac vein"),
        ("gluteus_maximus_left", "left gluteus maximus"),
        ("portal_vein_and_splenic_vein", "portal and splenic vein"),
        ("urinary_bladder", "urinary bladder"),
        ("liver", "liver"),
    ],
)
def test_readable_name(name, readable):
    assert organs.readable_name(name) == readable


def test_readable_names_are_unique_words():
    readable = organs.readable_names()
    assert len(readable) == 104 and len(set(readable.values())) == 104
    assert all("_" not in r and r == r.strip() for r in readable.values())


def _names(group: str) -> set[str]:
    return {organs.v1_names()[i] for i in organs.expand(group)}


def test_group_contents():
    assert _names("lungs") == {
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "lung_upper_lobe_right",
        "lung_middle_lobe_right",
        "lung_lower_lobe_right",
    }
    right_lobes = {"lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"}
    assert _names("right lung") == right_lobes
    assert _names("left lung") == {"lung_upper_lobe_left", "lung_lower_lobe_left"}
    assert _names("heart") == {
        "heart_myocardium",
        "heart_atrium_left",
        "heart_ventricle_left",
        "heart_atrium_right",
        "heart_ventricle_right",
    }
    assert _names("lumbar spine") == {f"vertebrae_L{i}" for i in range(1, 6)}
    assert _names("thoracic spine") == {f"vertebrae_T{i}" for i in range(1, 13)}
    assert _names("cervical spine") == {f"vertebrae_C{i}" for i in range(1, 8)}
    assert len(_names("spine")) == 24
    assert _names("kidneys") == {"kidney_left", "kidney_right"}
    assert _names("adrenal glands") == {"adrenal_gland_left", "adrenal_gland_right"}
    assert _names("ribs") == {f"rib_{s}_{i}" for s in ("left", "right") for i in range(1, 13)}
    assert _names("left ribs") == {f"rib_left_{i}" for i in range(1, 13)}
    assert _names("iliac vessels") == {
        "iliac_artery_left",
        "iliac_artery_right",
        "iliac_vena_left",
        "iliac_vena_right",
    }


def test_every_group_is_nonempty_and_valid():
    for name, ids in organs.groups().items():
        assert ids and len(set(ids)) == len(ids), name
        assert all(1 <= i <= 104 for i in ids), name


def test_expand_single_organ():
    assert organs.expand("liver") == (5,)
    with pytest.raises(KeyError):
        organs.expand("livers")


def test_v2_to_v1_mapping(shipped):
    v2 = {int(k): v for k, v in shipped["total_v2"].items()}
    assert organs.v2_names() == v2 and len(v2) == 117
    mapping = organs.v2_to_v1()
    assert set(mapping) == set(v2.values())
    v1 = set(organs.v1_names().values())
    for name, target in mapping.items():
        if name in v1:
            assert target == name
        assert target is None or target in v1
    assert mapping["kidney_cyst_left"] == "kidney_left"
    assert mapping["vertebrae_S1"] == "sacrum"
    assert mapping["heart"] is None  # v2's one heart spans five v1 classes: no single answer
    assert mapping["thyroid_gland"] is None and mapping["sternum"] is None


def test_v2_to_v1_lut_relabels_a_label_map():
    import numpy as np

    lut = np.asarray(organs.v2_to_v1_lut())
    v2_ids = {n: i for i, n in organs.v2_names().items()}
    names = ["liver", "heart", "kidney_cyst_right", "vertebrae_L3"]
    v2_map = np.array([0] + [v2_ids[n] for n in names])
    assert lut[v2_map].tolist() == [0, 5, 0, 2, organs.organ_id("vertebrae_L3")]
    assert lut.shape == (max(v2_ids.values()) + 1,) and lut.min() >= 0 and lut.max() <= 104


def test_v1_names_follow_totalsegmentator_naming():
    pattern = r"[a-z]+(?:_[a-z]+)*(?:_(?:left|right|\d+|[CTL]\d+))?|vertebrae_[CTL]\d+|rib_(?:left|right)_\d+"
    assert all(re.fullmatch(pattern, n) for n in organs.v1_names().values())
