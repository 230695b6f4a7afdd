"""The models file (FARMESH_MODELS_FILE): each model's price and limits, typed errors."""

import re
from decimal import Decimal
from pathlib import Path

import pytest

from farmesh_ws.config import ConfigError, load_settings
from farmesh_ws.models import BUNDLED_MODEL_ID
from farmesh_ws.models.catalog import CatalogError, load_catalog

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "models.example.toml"


def _folder(path: Path) -> Path:
    """A model folder as far as the catalog looks: one with a config.json."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def _file(tmp_path: Path, text: str) -> Path:
    """The models file ``text`` next to a model folder ``m``."""
    _folder(tmp_path / "m")
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_the_documented_example_loads_with_the_bundled_model_first(tmp_path: Path) -> None:
    copy = tmp_path / "models.toml"
    copy.write_text(EXAMPLE.read_text())
    folder = _folder(tmp_path / "models" / "tiny-llama")
    bundled, tiny = load_catalog(copy)
    assert bundled.model_id == BUNDLED_MODEL_ID
    assert bundled.path is None
    assert tiny.model_id == "tiny-llama"
    assert tiny.path == folder.resolve()
    assert tiny.price_per_token_far == Decimal("0.00002")
    assert tiny.max_length_limit == 512
    assert tiny.max_new_tokens_limit == 128


def test_settings_give_each_model_its_terms_within_the_gateway_limits(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        '[[model]]\nid = "a b.c"\npath = "m"\nprice_per_token_far = "0.5"\n'
        "max_length_limit = 99999\nmax_new_tokens_limit = 7\n",
    )
    settings = load_settings({"FARMESH_MODELS_FILE": str(path), "PRICE_PER_TOKEN_FAR": "0.01"})
    assert [m.model_id for m in settings.models] == [BUNDLED_MODEL_ID, "a b.c"]
    assert settings.models[1].dht_prefix == "a-b-c"
    assert settings.prices_for("a b.c").per_token == Decimal("0.5")
    assert settings.prices_for(BUNDLED_MODEL_ID).per_token == Decimal("0.01")
    assert settings.max_length_limit_for("a b.c") == settings.max_length_limit  # capped
    assert settings.max_new_tokens_limit_for("a b.c") == 7
    assert settings.max_new_tokens_limit_for(BUNDLED_MODEL_ID) == settings.max_new_tokens_limit


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[model]]\nid = "a"\npath = "m"\nprice_per_token_far = 0.1\n', "decimal string"),
        ('[[model]]\nid = "a"\npath = "m"\nprice_per_token_far = "-1"\n', "not negative"),
        ('[[model]]\nid = "a"\npath = "m"\nprice_per_token_far = "NaN"\n', "finite"),
        ('[[model]]\nid = "a"\npath = "m"\ncolour = "red"\n', "unknown field 'colour'"),
        ('[[model]]\npath = "m"\n', "id is required"),
        ('[[model]]\nid = "a"\n', "path is required"),
        ('[[model]]\nid = "a"\npath = "m"\ndht_prefix = "a.b"\n', "dht_prefix may hold"),
        ('[[model]]\nid = "a"\npath = "m"\nmax_length_limit = 8\n', "at least 16"),
        ('[[model]]\nid = "a"\npath = "m"\nmax_new_tokens_limit = true\n', "integer"),
        (f'[[model]]\nid = "{BUNDLED_MODEL_ID}"\npath = "m"\n', "listed twice"),
        ("include_bundled = false\n", "no model to serve"),
        ('include_bundled = "no"\n', "true or false"),
        ("models = []\n", "unknown key 'models'"),
        ("[[model]\n", "models.toml"),
        ('[[model]]\nid = "a"\npath = "elsewhere"\n', "not a model folder"),
        (
            '[[model]]\nid = "a"\npath = "m"\n'
            '[[model]]\nid = "a.b"\npath = "m"\ndht_prefix = "a"\n',
            "dht_prefix 'a' is listed twice",
        ),
        ('[[model]]\nid = "SmolLM2.135M.Instruct"\npath = "m"\n', "is listed twice"),
    ],
)
def test_a_bad_file_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(CatalogError, match=re.escape(message)):
        load_catalog(path)
    with pytest.raises(ConfigError, match="FARMESH_MODELS_FILE"):
        load_settings({"FARMESH_MODELS_FILE": str(path)})


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.toml"):
        load_settings({"FARMESH_MODELS_FILE": str(tmp_path / "nowhere.toml")})
