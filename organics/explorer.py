"""Figures to explore on a static page: precomputed frames behind HTML sliders, no kernel needed.

A live widget (``ipywidgets.interact``) redraws a figure as its sliders move, but only while a
Python kernel runs behind the page. On the static HTML book there is none, so an explorer here
draws every frame beforehand, over a grid of parameter values, and returns a self-contained
piece of HTML: one range slider per parameter, the frames inline (base64 PNG or SVG data
URIs) and a few lines of inline JavaScript that show the frame of the sliders' values. It loads
nothing from elsewhere, so it works offline, in the built book, in Jupyter and in Colab.

- :func:`render_frames`: draw a figure at every point of a parameter grid and keep its image;
- :func:`figure_bytes`: one figure as PNG (optionally reduced to a palette) or SVG bytes;
- :func:`slider_explorer`: the frames and their grid as an :class:`Explorer`, whose HTML Jupyter
  and the book display.

The frame is shown by an inline ``<svg>`` holding one ``<image>`` whose ``href`` the sliders
swap; every element id of an explorer starts with its own random ``element_id``, so several
explorers can share a page.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._checks import check_choice

__all__ = ["Explorer", "figure_bytes", "render_frames", "slider_explorer"]

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

# Runs once per explorer, where the explorer's HTML is: finds its own root (by the script's
# parent, or by id where `document.currentScript` is not set), reads the frames, and shows the
# frame of the sliders' positions on every `input` event. No globals, nothing loaded.
_SCRIPT = """(function () {
  var root = (document.currentScript && document.currentScript.parentElement) || document.getElementById(%(id)s);
  if (!root || root.dataset.ready) { return; }
  root.dataset.ready = "true";
  var data = JSON.parse(root.querySelector("script[type='application/json']").textContent);
  var image = root.querySelector("image");
  var sliders = Array.prototype.slice.call(root.querySelectorAll("input[type=range]"));
  function show() {
    var key = sliders.map(function (slider, k) {
      var label = data.labels[k][Number(slider.value)];
      slider.setAttribute("aria-valuetext", label);
      root.querySelector("output[for='" + slider.id + "']").textContent = label;
      return slider.value;
    }).join(",");
    image.setAttribute("href", data.frames[key]);
    root.setAttribute("data-frame", key);
  }
  sliders.forEach(function (slider) { slider.addEventListener("input", show); });
  show();
})();"""


@dataclass(frozen=True, repr=False)
class Explorer:
    """A static explorer: its HTML, which Jupyter and the book display (``_repr_html_``).

    Attributes
    ----------
    html : str
        The self-contained HTML fragment (sliders, frames, inline script).
    element_id : str
        The id of the explorer's root element; every other id in it starts with it.
    parameters : dict of str to tuple
        The grid: each parameter's values, in slider order.
    n_frames : int
        The number of frames (the product of the grid's sizes).
    frame_bytes : int
        The total size of the frames' images, before base64 encoding.
    """

    html: str
    element_id: str
    parameters: dict[str, tuple]
    n_frames: int
    frame_bytes: int

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        grid = " x ".join(f"{name} ({len(values)})" for name, values in self.parameters.items())
        kib = len(self.html.encode()) / 1024
        return f"<Explorer {self.element_id}: {self.n_frames} frames over {grid}, {kib:.0f} KiB of HTML>"


def figure_bytes(figure: Figure, *, format: str = "png", dpi: float = 80, colors: int | None = 64) -> bytes:
    """The figure as image bytes, small enough to inline many of them in one page.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        The figure to render.
    format : str
        ``"png"`` or ``"svg"``.
    dpi : float
        Resolution of a PNG, in dots per inch of the figure's size.
    colors : int, optional
        Reduce a PNG to a palette of this many colours (line art loses nothing visible, and the
        file shrinks about fivefold); None keeps full colour. Ignored for SVG.

    Returns
    -------
    bytes
        The PNG or SVG file.
    """
    check_choice("format", format, ("png", "svg"))
    buffer = io.BytesIO()
    metadata = {"Software": None} if format == "png" else {"Date": None}  # the same bytes on every run
    # a PNG about to be reduced to a palette is compressed only once, after the reduction
    options = {"pil_kwargs": {"compress_level": 0}} if format == "png" and colors is not None else {}
    figure.savefig(buffer, format=format, dpi=dpi, metadata=metadata, **options)
    data = buffer.getvalue()
    if format == "png" and colors is not None:
        from PIL import Image  # matplotlib's own dependency

        # octree, not median cut: median cut merges a few red pixels (a marker) into orange
        image = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors, method=Image.Quantize.FASTOCTREE)
        buffer = io.BytesIO()
        image.save(buffer, format="png", optimize=True)
        data = buffer.getvalue()
    return data


def render_frames(
    draw: Callable[..., object],
    parameters: Mapping[str, Sequence],
    *,
    figsize: tuple[float, float] = (4.8, 3.5),
    format: str = "png",
    dpi: float = 80,
    colors: int | None = 64,
    margins: Mapping[str, float] | None = None,
) -> dict[tuple, bytes]:
    """Draw one figure per point of the parameter grid and keep its image (see :func:`figure_bytes`).

    One figure with one axes is reused for every frame (cleared before each ``draw``) and never
    registered with pyplot, so nothing is left open or displayed.

    Parameters
    ----------
    draw : callable
        ``draw(ax, **values)`` draws the frame of one grid point on the axes ``ax``
        (a matplotlib.axes.Axes), with ``values`` a value of every parameter, by name.
    parameters : mapping of str to sequence
        Each parameter's values, in the order of :func:`slider_explorer`'s sliders.
    figsize : tuple of float
        Figure size in inches.
    format, dpi, colors
        As for :func:`figure_bytes`.
    margins : mapping of str to float, optional
        ``left``, ``right``, ``bottom``, ``top`` of ``Figure.subplots_adjust``, the same for
        every frame (so the axes do not jump as the sliders move); matplotlib's defaults if None.

    Returns
    -------
    dict of tuple to bytes
        The image of every grid point, keyed by its tuple of values in the parameters' order.
    """
    figure = Figure(figsize=figsize)
    ax: Axes = figure.add_subplot()
    if margins is not None:
        figure.subplots_adjust(**margins)
    names = list(parameters)
    frames = {}
    for point in itertools.product(*(parameters[name] for name in names)):
        ax.clear()
        draw(ax, **dict(zip(names, point, strict=True)))
        frames[point] = figure_bytes(figure, format=format, dpi=dpi, colors=colors)
    return frames


def _data_uri(frame: Figure | bytes) -> tuple[str, int]:
    if isinstance(frame, Figure):
        frame = figure_bytes(frame)
    if frame.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    elif frame.lstrip()[:5] in (b"<?xml", b"<svg ", b"<svg>", b"<!DOC"):
        mime = "image/svg+xml"
    else:
        raise ValueError("a frame must be a matplotlib Figure, PNG bytes or SVG bytes")
    return f"data:{mime};base64,{base64.b64encode(frame).decode('ascii')}", len(frame)


def _image_size(frame: bytes | Figure) -> tuple[float, float]:
    """Width and height of a frame, in pixels (PNG header, SVG width/height attributes in pt or px)."""
    if isinstance(frame, Figure):
        frame = figure_bytes(frame)
    if frame.startswith(b"\x89PNG"):
        return int.from_bytes(frame[16:20], "big"), int.from_bytes(frame[20:24], "big")
    head = frame[:2000].decode("utf-8", "replace")
    size = [re.search(rf'<svg[^>]*\b{key}="([0-9.]+)(pt|px)?"', head, re.S) for key in ("width", "height")]
    if not all(size):
        raise ValueError("an SVG frame needs width and height attributes")
    return tuple(float(m[1]) * (4 / 3 if m[2] == "pt" else 1) for m in size)


def slider_explorer(
    frames: Mapping[tuple, Figure | bytes],
    parameters: Mapping[str, Sequence],
    *,
    labels: Mapping[str, str] | None = None,
    initial: Mapping[str, object] | None = None,
    value_format: str = "{:g}",
    alt: str = "",
    caption: str | None = None,
    element_id: str | None = None,
) -> Explorer:
    """Self-contained HTML that shows one precomputed frame per grid point, chosen with sliders.

    Every parameter gets a range slider over the indices of its values (so any grid, e.g.
    logarithmic, has equal steps) with the current value beside it; moving a slider shows the
    frame of the sliders' values. The frames are inline data URIs and the script is inline:
    the HTML loads nothing from elsewhere and needs no kernel.

    Parameters
    ----------
    frames : mapping of tuple to Figure or bytes
        The frame of every grid point, keyed by its tuple of values in the order of
        ``parameters`` (as :func:`render_frames` returns them): PNG or SVG bytes, or matplotlib
        figures (rendered as 80 dpi PNG).
    parameters : mapping of str to sequence
        Each parameter's values, in slider order; every combination must have a frame, and
        there must be no other frame.
    labels : mapping of str to str, optional
        HTML shown before a parameter's slider (its name by default), e.g. ``"<i>w</i><sub>r</sub>"``.
    initial : mapping of str to object, optional
        The value each slider starts at (one of its values; the first by default).
    value_format : str
        Format of the values shown beside the sliders.
    alt : str
        Text alternative of the frames, for screen readers (plain text).
    caption : str, optional
        HTML shown under the sliders.
    element_id : str, optional
        The id of the explorer's root element (a letter, then letters, digits, ``-`` or ``_``);
        a fresh random one by default.

    Returns
    -------
    Explorer
        The HTML, with the grid it covers.
    """
    names = list(parameters)
    grid = {name: tuple(parameters[name]) for name in names}
    if not names or any(len(values) == 0 for values in grid.values()):
        raise ValueError("every parameter needs at least one value")
    repeated = [name for name, values in grid.items() if len(set(values)) < len(values)]
    if repeated:
        raise ValueError(f"parameters must not repeat a value (1.0 and True count as one), got repeats in {repeated}")
    points = list(itertools.product(*grid.values()))
    missing = [point for point in points if point not in frames]
    if missing:
        raise ValueError(f"no frame for {len(missing)} grid point(s), e.g. {missing[0]}")
    if len(frames) != len(points):
        raise ValueError(f"{len(frames) - len(points)} frame(s) outside the grid")
    element_id = element_id or f"organics-explorer-{uuid.uuid4().hex[:12]}"
    if not _ID.fullmatch(element_id):
        raise ValueError(f"element_id must match {_ID.pattern}, got {element_id!r}")
    labels = dict(labels or {})
    initial = dict(initial or {})
    start = []
    for name in names:
        value = initial.get(name, grid[name][0])
        if value not in grid[name]:
            raise ValueError(f"initial {name} = {value!r} is not one of its values {grid[name]}")
        start.append(grid[name].index(value))

    uris, total = {}, 0
    for indices in itertools.product(*(range(len(values)) for values in grid.values())):
        point = tuple(grid[name][i] for name, i in zip(names, indices, strict=True))
        uris[",".join(map(str, indices))], size = _data_uri(frames[point])
        total += size
    width, height = _image_size(frames[points[0]])
    value_labels = [[value_format.format(value) for value in grid[name]] for name in names]
    # "<" escaped, so no "</script>" can end the JSON's script element early
    data = json.dumps({"labels": value_labels, "frames": uris}, separators=(",", ":")).replace("<", "\\u003c")

    sliders = []
    for k, name in enumerate(names):
        slider_id = f"{element_id}-slider-{k}"
        sliders.append(
            f'<label for="{slider_id}" style="display:flex;align-items:center;gap:0.6em;margin:0.2em 0">'
            f'<span style="min-width:3em">{labels.get(name, html.escape(name))}</span>'
            f'<input type="range" id="{slider_id}" name="{html.escape(name)}" min="0" '
            f'max="{len(grid[name]) - 1}" step="1" value="{start[k]}" style="flex:1;max-width:24em">'
            f'<output for="{slider_id}" style="min-width:4em">{html.escape(value_labels[k][start[k]])}</output>'
            "</label>"
        )
    first = uris[",".join(map(str, start))]
    parts = [
        f'<div class="organics-explorer" id="{element_id}" data-frame="{",".join(map(str, start))}" '
        'style="margin:0.5em 0 1em 0">',
        f'<svg viewBox="0 0 {width:g} {height:g}" role="img" aria-label="{html.escape(alt)}" '
        f'style="display:block;width:100%;max-width:{width:g}px;height:auto;background:white">'
        f'<image width="{width:g}" height="{height:g}" href="{first}"></image></svg>',
        '<div class="organics-explorer-controls" style="max-width:36em">',
        *sliders,
        "</div>",
    ]
    if caption:
        parts.append(f'<div class="organics-explorer-caption" style="font-size:0.9em">{caption}</div>')
    parts += [
        f'<script type="application/json" id="{element_id}-frames">{data}</script>',
        f"<script>{_SCRIPT % {'id': json.dumps(element_id)}}</script>",
        "</div>",
    ]
    return Explorer(
        html="\n".join(parts), element_id=element_id, parameters=grid, n_frames=len(points), frame_bytes=total
    )
