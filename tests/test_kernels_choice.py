"""QuantSpec and Choice: validation, labels, per-layer specs, dict round trips."""
import pytest

from kernels import SUPPORTED_BITS, Choice, QuantSpec


def test_labels_follow_the_documented_grammar():
    assert Choice(4).label == "w4"
    assert Choice(8, group_size=None).label == "w8gc"
    assert Choice(4, group_size=64).label == "w4g64"
    assert Choice(4, abits=8).label == "w4a8"
    assert Choice(4, symmetric=False).label == "w4asym"
    assert Choice(3, 8, 32, False).label == "w3g32a8asym"
    assert Choice(4, 8, None, act_format="fp8").label == "w4gcf8"  # float8 e4m3 activations


@pytest.mark.parametrize("label", ["w2", "w3gc", "w4g64", "w4a8", "w4asym", "w6g32a16asym", "w8gca8", "w4gcf8"])
def test_parse_round_trips(label):
    assert Choice.parse(label).label == label
    assert Choice.parse(Choice.parse(label).label) == Choice.parse(label)


@pytest.mark.parametrize("bad", ["w7", "4", "w4g0", "w4x", "", "W4", "w4f16", "w4a8f8"])
def test_parse_rejects_bad_labels(bad):
    with pytest.raises(ValueError):
        Choice.parse(bad)


def test_bad_bits_name_the_argument_and_allowed_values():
    with pytest.raises(ValueError, match=r"bits=7 is not supported; choose from \(2, 3, 4, 5, 6, 8\)"):
        QuantSpec(7)
    with pytest.raises(ValueError, match="wbits=16"):
        Choice(16)
    with pytest.raises(ValueError, match="group_size=0"):
        QuantSpec(4, 0)
    with pytest.raises(ValueError, match="scale_dtype='float64'"):
        QuantSpec(4, scale_dtype="float64")
    with pytest.raises(ValueError, match="abits=1"):
        Choice(4, abits=1)
    with pytest.raises(ValueError, match=r"act_format='fp4' is not supported; choose from \('int', 'fp8'\)"):
        Choice(4, 8, act_format="fp4")
    with pytest.raises(ValueError, match="act_format='fp8' takes abits=8"):
        Choice(4, 4, act_format="fp8")
    with pytest.raises(TypeError, match="symmetric"):
        QuantSpec(4, symmetric="yes")


def test_spec_for_defaults_per_layer_kind():
    c = Choice(4)
    assert c.spec_for("linear", 4096) == QuantSpec(4, 128)
    assert c.spec_for("hf_conv1d", 768) == QuantSpec(4, 128)
    assert c.spec_for("conv2d", 3 * 3 * 64) == QuantSpec(4, None)
    assert c.spec_for("conv1d", 96) == QuantSpec(4, None)
    assert c.spec_for("linear", 128) == QuantSpec(4, None)  # one group spanning the row == per channel
    assert Choice(4, group_size=64).spec_for("conv2d", 576) == QuantSpec(4, 64)
    assert Choice(8, group_size=None, symmetric=False).spec_for("linear", 512) == QuantSpec(8, None, False)
    with pytest.raises(ValueError, match="kind='embedding'"):
        c.spec_for("embedding", 10)


def test_dict_round_trips_and_hashing():
    for bits in SUPPORTED_BITS:
        spec = QuantSpec(bits, 32, False, "bfloat16")
        assert QuantSpec.from_dict(spec.to_dict()) == spec
        choice = Choice(bits, 8, None, False)
        assert Choice.from_dict(choice.to_dict()) == choice
    assert len({Choice(4), Choice.parse("w4"), Choice(4, group_size="default")}) == 1
    assert QuantSpec(4, 100).n_groups(250) == 3 and QuantSpec(4, None).n_groups(250) == 1
