"""
Labelled PNG charts for the README's toy ablations, drawn with Pillow alone (no matplotlib
dependency): grouped bars with error whiskers and an optional chance line (bar_chart), and curves
over N (line_chart). Every chart is 720x420, white, in the colour-blind friendly Okabe-Ito palette;
files are written atomically.
"""

import math
import os
import tempfile
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

W, H = 720, 420
# Okabe-Ito, most readable on white first (their yellow is last: it is faint on a white background)
PALETTE = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (213, 94, 0), (204, 121, 167),
           (86, 180, 233), (0, 0, 0), (240, 228, 66)]
INK, GRID, WHISKER, REFERENCE = (30, 30, 30), (228, 228, 228), (40, 40, 40), (110, 110, 110)
# plot box; its top depends on how many legend rows there are
LEFT, RIGHT, BOTTOM = 72, W - 20, H - 56


@lru_cache(maxsize=None)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()            # older Pillow: the fixed bitmap font


def _text(draw, x, y, s, size=12, fill=INK, ha="center", va="top"):
    """Text aligned by hand (Pillow's anchors are not supported by the bitmap fallback font)."""
    font = _font(size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), s, font=font)
    dx = {"left": 0, "center": (x1 - x0) / 2, "right": x1 - x0}[ha]
    dy = {"top": 0, "center": (y1 - y0) / 2, "bottom": y1 - y0}[va]
    draw.text((x - x0 - dx, y - y0 - dy), s, font=font, fill=fill)


def fmt3(v: float) -> str:
    """3 significant digits, trailing zeros kept so a column lines up: 0.452, 45.2, 1.86, 0.500."""
    return "n/a" if math.isnan(v) else f"{v:#.3g}".rstrip(".")


def _nice_ceil(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= v."""
    if v <= 0:
        return 1.0
    p = 10.0 ** math.floor(math.log10(v))
    return next(m * p for m in (1, 2, 2.5, 5, 10) if m * p >= v * (1 - 1e-9))


def _tick_step(span: float) -> float:
    """The smallest nice step giving at most 6 ticks over span (the next smaller one gave >= 7, so
    this one gives >= 4)."""
    step = _nice_ceil(span / 6)
    while math.floor(span / step + 1e-9) + 1 > 6:
        step = _nice_ceil(step * 1.01)
    return step


def _row(name, row, n, what):
    """n floats; NaN means "missing" and is kept, anything else not a finite number is an error."""
    if len(row) != n:
        raise ValueError(f"{name} must have {n} entries ({what}), got {len(row)}")
    try:
        out = [float(v) for v in row]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold numbers, got {list(row)!r}") from None
    if any(math.isinf(v) for v in out):
        raise ValueError(f"{name} holds an infinite value: {out!r}")
    return out


def _seq(name, rows, like):
    """A list as long as `like` (its rows are checked by _row)."""
    if len(rows) != len(like):
        raise ValueError(f"{name} must have {len(like)} entries, got {len(rows)}")
    return rows


def _errors(name, row, n, what):
    """Whisker half-lengths: a missing (NaN) error draws no whisker; a negative one is a mistake."""
    out = [0.0 if math.isnan(e) else e for e in _row(name, row, n, what)]
    if any(e < 0 for e in out):
        raise ValueError(f"{name} must not be negative, got {out!r}")
    return out


def _canvas(title, names, line):
    """White image, title, a legend row (wrapped if long) under it -> (img, draw, plot top)."""
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    _text(draw, W / 2, 10, title, size=16)
    x, y = LEFT, 36
    for i, name in enumerate(names):
        width = 22 + draw.textbbox((0, 0), name, font=_font(12))[2] + 16
        if x + width > RIGHT and x > LEFT:
            x, y = LEFT, y + 18
        c = PALETTE[i % len(PALETTE)]
        if line:   # a line with a marker, like the curves it names
            draw.line([(x, y + 6), (x + 16, y + 6)], fill=c, width=2)
            draw.ellipse([x + 5, y + 3, x + 11, y + 9], fill=c)
        else:
            draw.rectangle([x + 2, y + 1, x + 13, y + 11], fill=c)
        _text(draw, x + 22, y + 6, name, va="center", ha="left")
        x += width
    return img, draw, y + 30


def _y_axis(img, draw, top, lo, hi, ylabel):
    """Grid lines, tick labels and the axis line -> value to pixel row, clamped to the plot."""
    step = _tick_step(hi - lo)
    # 0.25 -> 2, 20 -> 0
    decimals = next(d for d in range(8) if abs(round(step, d) - step) < 1e-9 * step)

    def y_of(v):
        return min(BOTTOM, max(top, BOTTOM - (v - lo) / (hi - lo) * (BOTTOM - top)))

    k = math.ceil(lo / step - 1e-9)
    while k * step <= hi + 1e-9 * step:
        y = y_of(k * step)
        draw.line([(LEFT, y), (RIGHT, y)], fill=GRID)
        _text(draw, LEFT - 6, y, f"{k * step:.{decimals}f}", size=11, ha="right", va="center")
        k += 1
    draw.line([(LEFT, top), (LEFT, BOTTOM), (RIGHT, BOTTOM)], fill=INK)
    if ylabel:   # rotated: drawn on its own strip, then turned and pasted
        strip = Image.new("RGB", (BOTTOM - top, 16), "white")
        _text(ImageDraw.Draw(strip), strip.width / 2, 8, ylabel, va="center")
        img.paste(strip.rotate(90, expand=True), (4, top))
    return y_of


def _x_axis(draw, centers, labels, xlabel):
    for cx, s in zip(centers, labels):
        draw.line([(cx, BOTTOM), (cx, BOTTOM + 4)], fill=INK)
        _text(draw, cx, BOTTOM + 8, s)
    if xlabel:
        _text(draw, (LEFT + RIGHT) / 2, H - 20, xlabel)


def _whisker(draw, x, y_lo, y_hi):
    draw.line([(x, y_lo), (x, y_hi)], fill=WHISKER)
    draw.line([(x - 3, y_lo), (x + 3, y_lo)], fill=WHISKER)
    draw.line([(x - 3, y_hi), (x + 3, y_hi)], fill=WHISKER)


def _save(img, path):
    """Save next to the target, then rename: a reader never sees a half-written PNG."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=".plot-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def bar_chart(path, title: str, groups: list[str], series: list[str], values: list[list[float]],
              errors: list[list[float]] | None = None, ylabel: str = "", ymax: float | None = None,
              reference: dict[str, float] | None = None) -> None:
    """Grouped bars: values[g][s] is series s in group g, errors[g][s] its ±whisker; NaN: "n/a"."""
    if not groups:
        raise ValueError("groups must not be empty")
    if not series:
        raise ValueError("series must not be empty")
    n = len(series)
    values = [_row(f"values[{g}]", row, n, "one per series")
              for g, row in enumerate(_seq("values", values, groups))]
    errors = [[0.0] * n for _ in groups] if errors is None else \
        [_errors(f"errors[{g}]", row, n, "one per series")
         for g, row in enumerate(_seq("errors", errors, groups))]
    reference = dict(reference or {})
    if any(not math.isfinite(float(y)) for y in reference.values()):
        raise ValueError(f"reference values must be finite numbers, got {reference!r}")
    tops = [v + e for vr, er in zip(values, errors) for v, e in zip(vr, er) if not math.isnan(v)]
    ymax = _nice_ceil(max(tops + list(reference.values()) + [0.0])) if ymax is None else float(ymax)
    if not ymax > 0:
        raise ValueError(f"ymax must be > 0, got {ymax}")

    img, draw, top = _canvas(title, series, line=False)
    y_of = _y_axis(img, draw, top, 0.0, ymax, ylabel)
    gw = (RIGHT - LEFT) / len(groups)
    bw = 0.8 * gw / len(series)   # bars fill 80% of their group; the rest separates groups
    # value labels as large as fit their bars (wider ones would run into the next bar's)
    labels = [fmt3(v) for vr in values for v in vr]
    size = next((z for z in (11, 10, 9) if all(draw.textlength(t, font=_font(z)) <= bw - 1
                                               for t in labels)), 8)
    for g, (vr, er) in enumerate(zip(values, errors)):
        for s, (v, e) in enumerate(zip(vr, er)):
            x0 = LEFT + g * gw + 0.1 * gw + s * bw
            cx = x0 + bw / 2
            if math.isnan(v):
                _text(draw, cx, BOTTOM - 4, "n/a", size=11, va="bottom")
                continue
            if y_of(v) < BOTTOM - 1:   # a zero (or negative, clipped) value has no bar to draw
                draw.rectangle([x0 + 1, y_of(v), x0 + bw - 2, BOTTOM - 1],
                               fill=PALETTE[s % len(PALETTE)])
            if e > 0:
                _whisker(draw, cx, y_of(v - e), y_of(v + e))
            _text(draw, cx, y_of(v + e) - 3, fmt3(v), size=size, va="bottom")
    for label, y in reference.items():
        yy = y_of(y)
        for x in range(LEFT, RIGHT, 10):   # dashed: 6 px on, 4 px off
            draw.line([(x, yy), (min(x + 6, RIGHT), yy)], fill=REFERENCE, width=1)
        _text(draw, RIGHT - 2, yy - 2, label, size=11, fill=REFERENCE, ha="right", va="bottom")
    _x_axis(draw, [LEFT + (g + 0.5) * gw for g in range(len(groups))], groups, "")
    _save(img, path)


def line_chart(path, title: str, x: list[float], series: dict[str, list[float]],
               errors: dict[str, list[float]] | None = None, xlabel: str = "", ylabel: str = "",
               xticklabels: list[str] | None = None, ymin: float | None = None,
               ymax: float | None = None) -> None:
    """Curves: a polyline with markers per series, points evenly spaced; NaN: a gap and "n/a"."""
    if not x:
        raise ValueError("x must not be empty")
    if not series:
        raise ValueError("series must not be empty")
    names, n = list(series), len(x)
    ys = {k: _row(f"series[{k!r}]", series[k], n, "one per x") for k in names}
    errors = dict(errors or {})
    if set(errors) - set(names):
        extra = sorted(set(errors) - set(names))
        raise ValueError(f"errors has keys that are not in series: {extra!r}")
    es = {k: _errors(f"errors[{k!r}]", errors.get(k, [0.0] * n), n, "one per x") for k in names}
    labels = [f"{v:g}" for v in _row("x", x, n, "")] if xticklabels is None else \
        [str(s) for s in _seq("xticklabels", xticklabels, x)]
    span = [v + d for k in names for v, e in zip(ys[k], es[k]) if not math.isnan(v)
            for d in (-e, e)] or [0.0, 1.0]
    lo = min(span) if ymin is None else float(ymin)
    hi = max(span) if ymax is None else float(ymax)
    if hi - lo < 1e-12:   # a flat curve: give it room
        lo, hi = lo - max(1.0, abs(lo)) * 0.1, hi + max(1.0, abs(hi)) * 0.1
    step = _tick_step(hi - lo)   # widen defaults out to whole ticks
    lo = math.floor(lo / step + 1e-9) * step if ymin is None else lo
    hi = math.ceil(hi / step - 1e-9) * step if ymax is None else hi
    if not hi > lo:
        raise ValueError(f"ymax must be > ymin, got ymin={lo}, ymax={hi}")

    img, draw, top = _canvas(title, names, line=True)
    y_of = _y_axis(img, draw, top, lo, hi, ylabel)
    pad = 30   # keeps the first and last markers off the axis lines
    xs = [LEFT + pad + i * (RIGHT - LEFT - 2 * pad) / max(1, len(x) - 1)
          for i in range(len(x))] if len(x) > 1 else [(LEFT + RIGHT) / 2]
    for k, name in enumerate(names):
        c = PALETTE[k % len(PALETTE)]
        pts = [(px, None if math.isnan(v) else y_of(v)) for px, v in zip(xs, ys[name])]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if y0 is not None and y1 is not None:   # a NaN point breaks the polyline
                draw.line([(x0, y0), (x1, y1)], fill=c, width=2)
        for (px, py), v, e in zip(pts, ys[name], es[name]):
            if py is None:
                _text(draw, px, BOTTOM - 4 - 14 * k, "n/a", size=11, fill=c, va="bottom")
                continue
            if e > 0:
                _whisker(draw, px, y_of(v - e), y_of(v + e))
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=c)
    _x_axis(draw, xs, labels, xlabel)
    _save(img, path)
