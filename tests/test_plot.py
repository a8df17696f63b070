"""experiments/plot.py: the charts the README embeds are drawn where the numbers say, and bad input
is refused by name."""

import math
import os

import pytest
from PIL import Image

from experiments import plot


def pixels_of(img, colour):
    return [(x, y) for y in range(img.height) for x in range(img.width)
            if img.getpixel((x, y)) == colour]


def bar_heights(img, colour):
    """Height in pixels of each bar of one colour, left to right (adjacent columns form a bar)."""
    cols = {}
    for x, y in pixels_of(img, colour):
        if y > 60:   # below the legend
            cols.setdefault(x, []).append(y)
    bars, last = [], None
    for x in sorted(cols):
        h = max(cols[x]) - min(cols[x]) + 1
        if last is not None and x == last + 1:
            bars[-1] = max(bars[-1], h)   # the whisker's column is shorter: keep the full one
        else:
            bars.append(h)
        last = x
    return bars


def test_bar_heights_follow_values(tmp_path):
    path = tmp_path / "bars.png"
    plot.bar_chart(path, "acc", ["a", "b"], ["one", "two"], [[20.0, 80.0], [40.0, float("nan")]],
                   errors=[[2.0, 5.0], [0.0, 0.0]], ylabel="%", ymax=100, reference={"chance": 25})
    img = Image.open(path).convert("RGB")
    assert img.size == (plot.W, plot.H)
    assert not [f for f in os.listdir(tmp_path) if f != "bars.png"]   # no temp file left behind
    blue, orange = plot.PALETTE[0], plot.PALETTE[1]
    # series 0 has bars 20 and 40 tall; series 1 only one bar (80), its NaN draws none
    heights = {c: bar_heights(img, c) for c in (blue, orange)}
    assert len(heights[blue]) == 2 and len(heights[orange]) == 1
    assert heights[orange][0] == pytest.approx(2 * heights[blue][1], rel=0.05)   # 80 vs 40
    assert heights[blue][0] == pytest.approx(heights[blue][1] / 2, rel=0.08)     # 20 vs 40

def test_line_chart_draws_each_series(tmp_path):
    path = tmp_path / "lines.png"
    plot.line_chart(path, "best-of-n", [1, 2, 4, 8],
                    {"prm": [50, 55, 60, 62], "majority": [50, 52, float("nan"), 54]},
                    errors={"prm": [1, 1, 1, 1]}, xlabel="N", ylabel="%",
                    xticklabels=["1", "2", "4", "8"])
    img = Image.open(path).convert("RGB")
    prm, maj = pixels_of(img, plot.PALETTE[0]), pixels_of(img, plot.PALETTE[1])
    assert prm and maj
    # the prm curve rises: its rightmost marker sits higher (smaller y) than its leftmost
    curve = [(x, y) for x, y in prm if y > 60]   # below the legend
    x0, x1 = min(x for x, _ in curve), max(x for x, _ in curve)
    left = [y for x, y in curve if x <= x0 + 4]
    right = [y for x, y in curve if x >= x1 - 4]
    assert min(right) < min(left)


@pytest.mark.parametrize("kwargs, name", [
    (dict(groups=["a"], series=["s"], values=[[1.0, 2.0]]), "values[0]"),
    (dict(groups=["a", "b"], series=["s"], values=[[1.0]]), "values"),
    (dict(groups=["a"], series=["s"], values=[[1.0]], errors=[[-1.0]]), "errors[0]"),
    (dict(groups=["a"], series=["s"], values=[[math.inf]]), "values[0]"),
    (dict(groups=["a"], series=["s"], values=[["x"]]), "values[0]"),
    (dict(groups=[], series=["s"], values=[]), "groups"),
])
def test_bar_chart_bad_input_names_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        plot.bar_chart(tmp_path / "x.png", "t", **kwargs)
    assert not os.listdir(tmp_path)


def test_line_chart_bad_input(tmp_path):
    with pytest.raises(ValueError, match="series"):
        plot.line_chart(tmp_path / "x.png", "t", [1, 2], {"a": [1.0]})
    with pytest.raises(ValueError, match="errors"):
        plot.line_chart(tmp_path / "x.png", "t", [1, 2], {"a": [1.0, 2.0]}, errors={"b": [0, 0]})
    assert not os.listdir(tmp_path)
