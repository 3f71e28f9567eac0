"""curation.charts: the report's SVG charts are well-formed, and what they draw is what they were given
(read back from the SVG: numpy's bin counts, the thresholds, one bar per stage)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np

from curation.charts import bars, histogram, ticks

NS = {"s": "http://www.w3.org/2000/svg"}


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # raises on anything a browser's XML parser would refuse


def test_ticks_are_round_and_cover_the_range():
    assert ticks(0, 27) == [0, 10, 20]
    assert ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert ticks(-0.08, 0.021) == [-0.075, -0.05, -0.025, 0.0]
    assert ticks(3, 3) == [3]
    for lo, hi in [(0.013, 0.9), (-5, 1234), (1e-6, 3e-6)]:
        t = ticks(lo, hi)
        assert 2 <= len(t) <= 8 and lo <= t[0] and t[-1] <= hi, (lo, hi, t)


def test_a_histogram_draws_each_series_with_shared_bins_and_every_threshold():
    rng = np.random.default_rng(0)
    kept, rejected = rng.normal(5, 1, 300), rng.normal(3, 1, 1000)
    svg = parse(histogram({"kept": (list(kept), 300), "not kept <all>": (list(rejected[:500]), 1000)},
                          "aesthetic & co", [4.5, 6.0], bins=20))
    assert svg.find("s:title", NS).text == "aesthetic & co"
    series = svg.findall(".//s:polygon[@class='series']", NS)
    assert [p.get("data-label") for p in series] == ["kept", "not kept <all>"]  # escaped, and read back intact
    lo, hi = min(kept.min(), rejected[:500].min(), 4.5), max(kept.max(), rejected[:500].max(), 6.0)
    edges = np.linspace(lo, hi, 21)
    for polygon, values in zip(series, [kept, rejected[:500]]):
        counts = [int(n) for n in polygon.get("data-counts").split()]
        assert counts == np.histogram(values, bins=edges)[0].tolist() and sum(counts) == len(values)
        assert len(polygon.get("points").split()) == 2 * 20 + 2  # a step outline: two corners per bin
    assert [float(line.get("data-value")) for line in svg.findall(".//s:line[@class='threshold']", NS)] == [4.5, 6.0]
    legend = [t.text for t in svg.findall(".//s:text", NS)]
    assert "kept (300)" in legend and "not kept <all> (1000)" in legend and "threshold 4.5" in legend


def test_a_histogram_of_nothing_or_of_one_value_or_of_nan_still_draws():
    for series in [{}, {"kept": ([], 0)}, {"kept": ([2.0, 2.0], 2)}, {"kept": ([float("nan"), 1.0], 2)}]:
        svg = parse(histogram(series, "t"))
        drawn = svg.findall(".//s:polygon[@class='series']", NS)
        finite = [v for v, _ in series.values() for v in v if v == v]
        assert sum(int(n) for p in drawn for n in p.get("data-counts").split()) == len(finite)


def test_bars_are_one_per_name_in_order_and_scaled_to_the_largest():
    svg = parse(bars({"analyze": 33.4, "extract": 1.9, "split": 0.0}, "time per stage"))
    drawn = svg.findall(".//s:rect[@class='bar']", NS)
    assert [r.get("data-name") for r in drawn] == ["analyze", "extract", "split"]
    widths = [float(r.get("width")) for r in drawn]
    assert widths[0] > 0 and abs(widths[1] / widths[0] - 1.9 / 33.4) < 0.01 and widths[2] == 0
    assert int(svg.get("height")) > 3 * 12  # the chart grows with the number of bars
