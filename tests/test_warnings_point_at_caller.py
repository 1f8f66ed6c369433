"""Warnings of this library name the user's line, whatever depth of the library raised them: the rank clamp
(through get_loldu_model -> add_loldu -> clamp_rank and through a reference-style factory), a layer left out
of "all-linear", a rank-deficient weight, and load_loldu's cast warning."""
import warnings

import pytest
import torch
import torch.nn as nn

from loldu_triton import (LoLDUConfig, LoLDUParametrization, RankClampWarning, add_loldu, get_loldu_model,
                          load_loldu, save_loldu)


def caught(call):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        call()
    assert seen, "no warning"
    return seen


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def test_the_rank_clamp_points_at_the_callers_line():
    for call in (lambda: get_loldu_model(model(), LoLDUConfig(rank=7)),
                 lambda: add_loldu(model(), rank=7),
                 lambda: add_loldu(model(), {nn.Linear: {"weight": lambda m: LoLDUParametrization.from_linear(m, 7)}})):
        seen = [w for w in caught(call) if issubclass(w.category, RankClampWarning)]
        assert seen and all(w.filename == __file__ for w in seen), [(w.filename, w.lineno) for w in seen]


def test_other_library_warnings_point_at_the_callers_line(tmp_path):
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(nn.Linear(8, 6), Custom(6, 4))
    assert all(w.filename == __file__ for w in caught(lambda: add_loldu(m, rank=2)))  # Custom left out

    zero = nn.Sequential(nn.Linear(8, 6))
    with torch.no_grad():
        zero[0].weight.zero_()
    assert all(w.filename == __file__ for w in caught(lambda: add_loldu(zero, rank=3)))  # rank-deficient

    adapted = add_loldu(model(), rank=2)
    save_loldu(adapted, tmp_path)
    cast = model().to(torch.float64)  # the same base in another dtype: loads with a warning
    seen = caught(lambda: load_loldu(cast, tmp_path))
    assert any("not byte-identical" in str(w.message) for w in seen)
    assert all(w.filename == __file__ for w in seen), [(w.filename, w.lineno) for w in seen]


@pytest.mark.parametrize("stacklevel_depth", [1, 3])
def test_a_warning_from_nested_user_code_points_at_the_innermost_user_frame(stacklevel_depth):
    def nested(depth):
        if depth == 0:
            return add_loldu(model(), rank=7)
        return nested(depth - 1)

    seen = [w for w in caught(lambda: nested(stacklevel_depth)) if issubclass(w.category, RankClampWarning)]
    assert seen and all(w.filename == __file__ for w in seen)
    lines = {w.lineno for w in seen}
    assert len(lines) == 1  # the line inside nested() that called add_loldu
