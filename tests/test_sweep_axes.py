"""Sweep axis parsing (A1111 X/Y/Z plot syntax) and the X x Y x Z expansion into cells."""

import numpy as np
import pytest

from sdcli.app import sweep_axes as sa
from sdcli.runtime.errors import UsageError


def _a1111_int_range(start, end, step=None, count=None):
    """A1111 scripts/xyz_grid.py process_axis for int axes (positive steps), transcribed as the oracle."""
    if count is not None:
        return [int(x) for x in np.linspace(start=start, stop=end, num=count).tolist()]
    return list(range(start, end + 1, step or 1))


def _a1111_float_range(start, end, step=None, count=None):
    if count is not None:
        return np.linspace(start=start, stop=end, num=count).tolist()
    step = step or 1
    return np.arange(start, end + step, step).tolist()


def test_plain_values_are_typed_by_the_config_key():
    assert sa.parse_axis("steps=10,20, 30").values == (10, 20, 30)
    assert sa.parse_axis("cfg=5,7.5,10").values == (5.0, 7.5, 10.0)
    assert all(type(v) is float for v in sa.parse_axis("cfg=5,7").values)
    assert sa.parse_axis("sampler=euler,dpm++_2m").values == ("euler", "dpm++_2m")
    assert sa.parse_axis("seamless=true,false").values == (True, False)
    assert sa.parse_axis("clip-skip=1,2").key == "clip_skip"
    assert sa.parse_axis("hires_steps=5").values == (5,)


@pytest.mark.parametrize("text, args", [("1-8", (1, 8)), ("1-10 (+2)", (1, 10, 2)), ("1-10 [5]", (1, 10, None, 5)),
                                        ("0 - 9 [4]", (0, 9, None, 4)), ("5-5", (5, 5)), ("1-7 (+10)", (1, 7, 10)),
                                        ("1-9 (+3)", (1, 9, 3)), ("2-11 [1]", (2, 11, None, 1))])
def test_int_ranges_match_a1111(text, args):
    assert list(sa.parse_axis(f"seed={text}").values) == _a1111_int_range(*args)


def test_negative_int_range_on_a_key_that_allows_it():
    assert sa.parse_axis("seed=-1-1").values == (-1, 0, 1)


@pytest.mark.parametrize("text, args", [("1-3", (1.0, 3.0)), ("1.5-3.5 (+0.5)", (1.5, 3.5, 0.5)),
                                        ("0-1 (+0.1)", (0.0, 1.0, 0.1)), ("3-9 [4]", (3.0, 9.0, None, 4))])
def test_float_ranges_match_a1111(text, args):
    ours = sa.parse_axis(f"cfg={text}").values
    theirs = _a1111_float_range(*args)
    assert len(ours) == len(theirs) and np.allclose(ours, theirs, atol=1e-9)


def test_float_ranges_give_the_decimals_meant():
    assert sa.parse_axis("strength=0-0.3 (+0.1)").values == (0.0, 0.1, 0.2, 0.3)
    # A1111's np.arange(0.5, 0.9 + 0.2, 0.2) rounds its way to a fourth value, 1.0999999999999999: ours stops at
    # the end given
    assert sa.parse_axis("cfg=0.5-0.9 (+0.2)").values == (0.5, 0.7, 0.9)


def test_descending_ranges_include_the_end():
    assert sa.parse_axis("steps=10-1 (-3)").values == (10, 7, 4, 1)
    assert sa.parse_axis("steps=10-4 [3]").values == (10, 7, 4)


def test_ranges_mix_with_single_values():
    assert sa.parse_axis("seed=1-3, 10, 20-22").values == (1, 2, 3, 10, 20, 21, 22)


def test_quoted_values_keep_their_commas():
    axis = sa.parse_axis('prompt_sr="red, shiny",blue, "green, dull"')
    assert axis.values == ("red, shiny", "blue", "green, dull")
    assert sa.parse_axis('sigmas="14.6,7,3,0","10,5,0"').values == ("14.6,7,3,0", "10,5,0")


def test_strings_are_not_ranges():
    assert sa.parse_axis("prompt_sr=cat,dog-2-3").values == ("cat", "dog-2-3")
    assert sa.parse_axis("schedule=karras,sgm-uniform").values == ("karras", "sgm-uniform")


def test_lora_weights():
    axis = sa.parse_axis("lora:MyStyle_v2=0-1 [3]")
    assert axis.key == "lora:MyStyle_v2" and axis.values == (0.0, 0.5, 1.0)
    assert axis.labels() == ["lora:MyStyle_v2: 0", "lora:MyStyle_v2: 0.5", "lora:MyStyle_v2: 1"]


@pytest.mark.parametrize("spec, message", [
    ("cfg", "expected KEY=V1"), ("=1,2", "expected KEY=V1"), ("cfg=", "no values"), ("cfg=1,,2", "empty value"),
    ("steps=1.5", "not an integer"), ("cfg=high", "not a number"), ("steps=0,10", "between 1 and 1000"),
    ("cfg=5,nan", "finite"), ("strength=0-2", "between 0.0 and 1.0"), ("width=100", "multiple of 8"),
    ("seamless=yes", "not true or false"), ("model=a,b", "cannot be swept"), ("n=1,2", "cannot be swept"),
    ("colour=1", "unknown key"), ("steps=1-10 (+0)", "never gets"), ("steps=10-1 (+1)", "never gets"),
    ("seed=1-100000000", "more than"), ("steps=1.5-3", "not a range of ints"), ("lora:=1", "name the LoRA"),
    ("lora:x=inf", "finite"), ("steps=1-3 [0]", "count must be"), ('prompt_sr="a', "cannot read"),
])
def test_bad_axes_are_usage_errors_naming_the_option(spec, message):
    with pytest.raises(UsageError, match=message) as err:
        sa.parse_axis(spec, "--y")
    assert "--y" in str(err.value)


def test_labels_follow_a1111():
    assert sa.parse_axis("cfg=7,7.5").labels() == ["cfg: 7", "cfg: 7.5"]
    assert sa.parse_axis("prompt_sr=cat,dog").labels() == ["cat", "dog"]
    assert sa.parse_axis("strength=0-0.3 (+0.1)").labels()[3] == "strength: 0.3"


# --- expansion ------------------------------------------------------------------------------------

def test_expand_is_z_outer_then_rows_then_columns():
    x, y, z = sa.parse_axis("cfg=5,7"), sa.parse_axis("steps=10,20,30"), sa.parse_axis("seed=1-2")
    cells = sa.expand("a cat", "", x, y, z)
    assert len(cells) == 12
    assert [c.index for c in cells[:4]] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    for c in cells:
        ix, iy, iz = c.index
        assert c.settings == {"cfg": x.values[ix], "steps": y.values[iy], "seed": z.values[iz]}
        assert c.prompt == "a cat"
    assert cells[-1].index == (1, 2, 1)


def test_expand_one_axis():
    cells = sa.expand("p", "n", sa.parse_axis("sampler=euler,heun"))
    assert [(c.index, c.settings) for c in cells] == [((0, 0, 0), {"sampler": "euler"}),
                                                     ((1, 0, 0), {"sampler": "heun"})]


def test_prompt_sr_replaces_in_prompt_and_negative():
    sr = sa.parse_axis("prompt_sr=cat,dog,red fox")
    cells = sa.expand("a cat on a mat, cat ears", "ugly cat", sr)
    assert [c.prompt for c in cells] == ["a cat on a mat, cat ears", "a dog on a mat, dog ears",
                                         "a red fox on a mat, red fox ears"]
    assert [c.negative for c in cells] == ["ugly cat", "ugly dog", "ugly red fox"]
    assert all(c.settings == {} for c in cells)


def test_prompt_sr_found_only_in_the_negative_is_enough():
    cells = sa.expand("a portrait", "blurry", sa.parse_axis("prompt_sr=blurry,noisy"))
    assert [c.negative for c in cells] == ["blurry", "noisy"]


def test_prompt_sr_must_find_its_first_value():
    with pytest.raises(UsageError, match="'dog' is not in the prompt"):
        sa.expand("a cat", "", sa.parse_axis("cfg=5"), sa.parse_axis("prompt_sr=dog,cat"))


def test_two_prompt_sr_axes_apply_in_axis_order():
    cells = sa.expand("a red cat", "", sa.parse_axis("prompt_sr=red,blue"), sa.parse_axis("prompt_sr=cat,dog"))
    assert [c.prompt for c in cells] == ["a red cat", "a blue cat", "a red dog", "a blue dog"]


def test_a_swept_negative_takes_prompt_sr_too():
    cells = sa.expand("a cat", "cat hair", sa.parse_axis("negative=cat hair,none"),
                      sa.parse_axis("prompt_sr=cat,owl"))
    assert [(c.prompt, c.negative) for c in cells] == [("a cat", "cat hair"), ("a cat", "none"),
                                                       ("a owl", "owl hair"), ("a owl", "none")]
    assert all("negative" not in c.settings for c in cells)


def test_the_same_key_on_two_axes_is_refused():
    with pytest.raises(UsageError, match="swept on two axes"):
        sa.expand("p", "", sa.parse_axis("cfg=1,2"), sa.parse_axis("cfg=3,4"))
