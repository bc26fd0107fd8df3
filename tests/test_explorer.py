"""Static explorers: one inline frame per grid point behind sliders, self-contained HTML."""

import base64
import io
import json
import re
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from organics.explorer import Explorer, figure_bytes, render_frames, slider_explorer
from organics.planar import planar_circuit, plot_phase_portrait

matplotlib.use("Agg")

PARAMETERS = {"w_r": [0.0, 0.5, 1.0, 2.0], "z": [-1.0, 0.0, 1.0]}


def draw_line(ax, w_r, z):
    ax.plot([0, 1], [z, z + w_r], color="k")
    ax.set_ylim(-2, 4)


@pytest.fixture(scope="module")
def frames():
    return render_frames(draw_line, PARAMETERS, figsize=(2, 1.5), dpi=40)


class Elements(HTMLParser):
    """Every start tag of an HTML fragment, with its attributes, and the text of its script elements."""

    def __init__(self):
        super().__init__()
        self.tags, self.scripts, self._in_script = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def parse(explorer: Explorer) -> Elements:
    elements = Elements()
    elements.feed(explorer.html)
    return elements


def frame_data(explorer: Explorer) -> dict:
    match = re.search(r'<script type="application/json"[^>]*>(.*?)</script>', explorer.html, re.S)
    return json.loads(match[1])


def test_render_frames_draws_every_grid_point(frames):
    assert list(frames) == [(w_r, z) for w_r in PARAMETERS["w_r"] for z in PARAMETERS["z"]]
    assert all(frame.startswith(b"\x89PNG\r\n\x1a\n") for frame in frames.values())
    assert len(set(frames.values())) == len(frames), "each frame shows its own parameters"


def test_one_frame_per_grid_point(frames):
    explorer = slider_explorer(frames, PARAMETERS)
    data = frame_data(explorer)
    assert explorer.n_frames == len(data["frames"]) == 12
    assert sorted(data["frames"]) == sorted(f"{i},{j}" for i in range(4) for j in range(3))
    decoded = {base64.b64decode(uri.removeprefix("data:image/png;base64,")) for uri in data["frames"].values()}
    assert decoded == set(frames.values())
    assert explorer.frame_bytes == sum(map(len, frames.values()))
    assert all(uri.startswith("data:image/png;base64,") for uri in data["frames"].values())


def test_sliders_span_each_parameters_values(frames):
    explorer = slider_explorer(frames, PARAMETERS, initial={"w_r": 2.0, "z": 1.0}, labels={"w_r": "<i>w</i>"})
    sliders = [attrs for tag, attrs in parse(explorer).tags if tag == "input"]
    assert [s["type"] for s in sliders] == ["range", "range"]
    assert [(s["min"], s["max"], s["step"]) for s in sliders] == [("0", "3", "1"), ("0", "2", "1")]
    assert [s["value"] for s in sliders] == ["3", "2"]  # the initial values' indices
    assert frame_data(explorer)["labels"] == [["0", "0.5", "1", "2"], ["-1", "0", "1"]]
    assert "<i>w</i>" in explorer.html and ">z<" in explorer.html
    (image,) = [attrs for tag, attrs in parse(explorer).tags if tag == "image"]
    assert image["href"] == frame_data(explorer)["frames"]["3,2"], "the initial frame is shown before any script runs"
    assert explorer.parameters == {name: tuple(values) for name, values in PARAMETERS.items()}


def test_ids_are_unique_across_explorers(frames):
    first, second = slider_explorer(frames, PARAMETERS), slider_explorer(frames, PARAMETERS)
    ids = [attrs["id"] for explorer in (first, second) for _, attrs in parse(explorer).tags if "id" in attrs]
    assert len(ids) == len(set(ids)) == 2 * (1 + 2 + 1)  # root, two sliders, the frames' JSON
    assert first.element_id != second.element_id
    for explorer in (first, second):
        own = [attrs["id"] for _, attrs in parse(explorer).tags if "id" in attrs]
        assert all(i.startswith(explorer.element_id) for i in own)
        assert json.dumps(explorer.element_id) in explorer.html  # the script's fallback lookup


def test_self_contained(frames):
    explorer = slider_explorer(frames, PARAMETERS, caption="Move the sliders.")
    elements = parse(explorer)
    inline = re.sub(r"data:image/(png|svg\+xml);base64,[A-Za-z0-9+/=]+", "", explorer.html)
    assert not re.search(r"(https?:|url\(|//[a-z0-9])", inline, re.I), "a URL in the explorer's HTML"
    assert not [attrs for tag, attrs in elements.tags if "src" in attrs], "nothing is loaded from a src"
    assert [tag for tag, _ in elements.tags].count("script") == 2
    assert not any(tag in ("img", "link", "iframe") for tag, _ in elements.tags)
    assert explorer._repr_html_() == explorer.html
    assert "12 frames" in repr(explorer) and len(repr(explorer)) < 200


def test_frames_as_figures_and_svg():
    figure = Figure(figsize=(1, 1))
    figure.add_subplot().plot([0, 1])
    svg = figure_bytes(figure, format="svg")
    assert svg.lstrip().startswith(b"<?xml")
    png = slider_explorer({(1,): figure, (2,): figure_bytes(figure)}, {"k": [1, 2]})
    assert png.n_frames == 2 and "data:image/png;base64," in png.html
    vector = slider_explorer({(1,): svg, (2,): svg}, {"k": [1, 2]})
    assert "data:image/svg+xml;base64," in vector.html and 'viewBox="0 0 ' in vector.html


def test_palette_png_is_smaller_and_keeps_a_small_red_marker():
    """A phase portrait whose red star (a stable fixed point) median-cut quantization would turn orange."""
    figure = Figure(figsize=(5.6, 4.0))
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
    plot_phase_portrait(planar_circuit(0.0), 0.0, ax=figure.add_subplot(), resolution=40, y_lim=(-1.25, 1.25))
    palette = figure_bytes(figure, dpi=80, colors=64)
    assert len(palette) < len(figure_bytes(figure, dpi=80, colors=None)) / 2
    pixels = np.asarray(Image.open(io.BytesIO(palette)).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 230) & (pixels[..., 1] < 40) & (pixels[..., 2] < 40)
    assert red.sum() > 20, "the red marker changed colour"


def test_grid_is_checked(frames):
    incomplete = dict(frames)
    incomplete.pop((0.0, -1.0))
    with pytest.raises(ValueError, match="no frame"):
        slider_explorer(incomplete, PARAMETERS)
    with pytest.raises(ValueError, match="outside the grid"):
        slider_explorer(frames | {(3.0, 0.0): frames[(0.0, 0.0)]}, PARAMETERS)
    with pytest.raises(ValueError, match="initial"):
        slider_explorer(frames, PARAMETERS, initial={"z": 0.5})
    with pytest.raises(ValueError, match="element_id"):
        slider_explorer(frames, PARAMETERS, element_id="has space")
    with pytest.raises(ValueError, match="PNG bytes or SVG"):
        slider_explorer({(1,): b"GIF89a"}, {"k": [1]})
    with pytest.raises(ValueError, match=r"must not repeat a value .*\['k'\]"):
        slider_explorer({(1.0,): frames[(0.0, 0.0)]}, {"k": [1.0, 2.0, 1.0]})
