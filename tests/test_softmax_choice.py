"""``softmax_layers`` and ``softmax_heads`` as written by a user: one ``auto:N`` type and one parser for both, so the
two are accepted and refused alike; and the held-out sequences a choice is measured on."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from linspec.conversion.choice import Auto, parse_softmax_heads, parse_softmax_layers, text_sequences
from linspec.errors import LinspecError

PARSERS = {"softmax layers": parse_softmax_layers, "softmax heads": parse_softmax_heads}


@pytest.mark.parametrize("what", list(PARSERS))
def test_auto_n_is_one_type_for_layers_and_heads(what):
    chosen = PARSERS[what](" auto:3 ")
    assert chosen == Auto(3) and type(chosen) is Auto and str(chosen) == "auto:3"


@pytest.mark.parametrize("what", list(PARSERS))
@pytest.mark.parametrize("text", ["auto:0", "auto:x", "auto", "auto:-1", "auto:2,3"])
def test_a_bad_auto_is_refused_in_the_same_words_naming_the_choice(what, text):
    with pytest.raises(LinspecError) as error:
        PARSERS[what](text)
    assert str(error.value) == f"expected auto:N with N >= 1 ({what} chosen by measurement), got {text!r}"


@pytest.mark.parametrize(
    ("text", "layers", "heads"),
    [("", (), ()), ("  ", (), ()), ("0,5-7", (0, 5, 6, 7), None), ("4:1, 7:0", None, ((4, 1), (7, 0)))],
)
def test_lists_are_read_item_by_item_and_empty_text_means_none(text, layers, heads):
    for parse, expected in ((parse_softmax_layers, layers), (parse_softmax_heads, heads)):
        if expected is None:
            with pytest.raises(LinspecError, match="or auto:N, got"):
                parse(text)
        else:
            assert parse(text) == expected


def test_a_recipe_list_passes_through_as_tuples_and_other_values_are_refused_in_one_line():
    assert parse_softmax_layers([0, 3]) == (0, 3)
    assert parse_softmax_heads([[2, 1], [0, 0]]) == ((2, 1), (0, 0))
    for parse, expected in ((parse_softmax_layers, "layer indices like '0,5-7'"),
                            (parse_softmax_heads, "layer:kv-head pairs like '4:1,7:0'")):  # fmt: skip
        for value in (3, None, {"a": 1}, ",,"):
            with pytest.raises(LinspecError, match=f"expected {expected} or auto:N") as error:
                parse(value)
            assert "\n" not in str(error.value)


def test_a_pasted_huge_value_is_quoted_back_short():
    with pytest.raises(LinspecError) as error:
        parse_softmax_layers("x" * 10_000)
    assert len(str(error.value)) < 120 and "..." in str(error.value)


def test_parsing_a_choice_loads_no_heavy_library():
    """A bad flag or recipe key is refused before torch or transformers could load."""
    probe = (
        "import sys\n"
        "from linspec.conversion.choice import parse_softmax_heads, parse_softmax_layers\n"
        "parse_softmax_layers('auto:2'), parse_softmax_heads('1:0')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_text_sequences_are_the_first_whole_sequences():
    ids = torch.arange(50)
    assert torch.equal(text_sequences(ids, 16, 8), ids[:48].view(3, 16))
    assert torch.equal(text_sequences(ids, 16, 2), ids[:32].view(2, 16))
    with pytest.raises(LinspecError, match="the text has 50 tokens, fewer than one sequence of 64"):
        text_sequences(ids, 64, 2)
    with pytest.raises(LinspecError, match="must be an integer >= 2"):
        text_sequences(ids, 1, 2)
    with pytest.raises(LinspecError, match="must be an integer >= 1"):
        text_sequences(ids, 16, 0)
