"""OUT's layout and the run folder: the paths every stage writes and reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_mil.io.layout import Layout, encoder_dirname
from wsi_mil.io.run_folder import read_model_spec, read_trained


def test_paths_are_the_documented_ones() -> None:
    lay = Layout("OUT")
    assert lay.patches("s1") == Path("OUT/patches/s1.h5")
    assert lay.mask("s1") == Path("OUT/masks/s1.geojson")
    assert lay.thumbnail("s1") == Path("OUT/thumbnails/s1.png")
    assert lay.bag("hf-hub:MahmoodLab/UNI", "s1") == Path("OUT/features/hf-hub_MahmoodLab_UNI/h5_files/s1.h5")
    assert lay.pt("texture", "s1") == Path("OUT/features/texture/pt_files/s1.pt")
    assert lay.extract_config("texture") == Path("OUT/features/texture/extract_config.yaml")
    assert lay.tile_config == Path("OUT/tile_config.yaml")
    assert lay.run_dir("r1") == Path("OUT/models/r1")
    assert lay.heatmap_paths("r1", "s1")["gallery"] == Path("OUT/heatmaps/r1/galleries/s1.png")
    assert lay.heatmap_index("r1") == Path("OUT/heatmaps/r1/index.csv")
    assert (lay.status_csv, lay.status_store, lay.lock) == (
        Path("OUT/status.csv"), Path("OUT/.status"), Path("OUT/.wsi-mil.lock")
    )


@pytest.mark.parametrize("name", ["hf-hub:MahmoodLab/UNI", "resnet50_trunc", "local-dir:/a b/c", "::"])
def test_encoder_dirname_maps_a_folder_name_to_itself(name: str) -> None:
    folder = encoder_dirname(name)
    assert encoder_dirname(folder) == folder


def test_encoder_folders_lists_only_folders_with_bags(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    assert lay.encoder_folders() == []
    lay.bags_dir("b").mkdir(parents=True)
    lay.features_dir("a").mkdir(parents=True)
    assert lay.encoder_folders() == ["b"]


def test_run_folder_readers_on_a_missing_run(tmp_path: Path) -> None:
    assert read_trained(tmp_path) == {}
    with pytest.raises(Exception, match="not a trained wsi-mil run"):
        read_model_spec(tmp_path)
