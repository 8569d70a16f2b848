"""Plots shared by the benchmark scripts."""

from __future__ import annotations

from kvpacket_rag.evaluation.plots import labelled_panels


def test_labelled_panels_writes_one_png_with_a_panel_per_title(tmp_path):
    import matplotlib.image

    path = labelled_panels({"biography": [("stage 7", 0.07, 0.54), ("bare", 0.26, 0.42)],
                            "niah": [("stage 7", 0.06, 0.96)]},
                           "KL (log)", "fidelity", tmp_path / "frontier.png")
    assert path == tmp_path / "frontier.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 1.8 * height  # two panels side by side
