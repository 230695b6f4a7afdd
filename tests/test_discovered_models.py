"""Which local folder serves a model the DHT announces."""

from pathlib import Path

from farmesh_ws.discovered_models import local_folder_for


def _folder(path: Path, *, config: bool = True) -> Path:
    path.mkdir(parents=True)
    if config:
        (path / "config.json").write_text("{}")
    return path


def test_the_folder_named_after_the_model_serves_its_prefix(tmp_path: Path) -> None:
    wanted = _folder(tmp_path / "Some.Model v2")
    _folder(tmp_path / "other")
    assert local_folder_for("Some-Model-v2", tmp_path) == wanted
    assert local_folder_for("other", tmp_path) == tmp_path / "other"
    assert local_folder_for("missing", tmp_path) is None


def test_folders_without_a_config_and_partial_ones_never_count(tmp_path: Path) -> None:
    _folder(tmp_path / "empty", config=False)
    _folder(tmp_path / ".partial")
    assert local_folder_for("empty", tmp_path) is None
    assert local_folder_for("-partial", tmp_path) is None
    assert local_folder_for("anything", tmp_path / "nowhere") is None
