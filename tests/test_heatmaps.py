"""Heat-map file names of ``score --heatmaps``: after the source image, distinct when names collide."""

from __future__ import annotations

from pathlib import Path

from dfm_stream.heatmaps import heatmap_names


def test_heat_maps_are_named_after_their_images(tmp_path: Path) -> None:
    paths = [tmp_path / "line1" / "part_17.png", tmp_path / "line1" / "part_18.jpg"]
    assert heatmap_names(paths) == {paths[0]: "part_17.png", paths[1]: "part_18.png"}


def test_colliding_names_are_told_apart_by_folder_then_extension(tmp_path: Path) -> None:
    good, crack = tmp_path / "test" / "good" / "000.png", tmp_path / "test" / "crack" / "000.png"
    alone = tmp_path / "test" / "crack" / "001.png"
    jpg, png = tmp_path / "x" / "a.jpg", tmp_path / "x" / "a.png"
    names = heatmap_names([good, crack, alone, jpg, png])
    assert names == {
        good: "test__good__000.png",
        crack: "test__crack__000.png",
        alone: "001.png",
        jpg: "x__a.jpg.png",
        png: "x__a.png.png",
    }
    assert len(set(names.values())) == len(names)


def test_one_image_twice_gets_one_name(tmp_path: Path) -> None:
    a = tmp_path / "a.png"
    assert heatmap_names([a, a]) == {a: "a.png"}
    assert heatmap_names([]) == {}
