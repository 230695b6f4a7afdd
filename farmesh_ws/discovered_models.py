"""Models that come from DHT discovery: a model the mesh announces is served too when this
machine holds its client half (config, tokenizer, embeddings, head) in a folder of
``$FARMESH_HOME/models`` named after it, at the gateway-wide prices and limits. Anything else
the DHT announces is listed by ``/models`` as not servable, with the reason.
"""

import logging
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from farmesh_ws.config import Settings
from farmesh_ws.mesh.petals_model import ModelSpec
from farmesh_ws.models import dht_prefix_for
from farmesh_ws.models.catalog import ModelTerms

logger = logging.getLogger(__name__)


class DiscoveringBackend(Protocol):
    async def announced(self) -> dict[str, int]: ...

    async def add_model(self, spec: ModelSpec) -> None: ...


def local_folder_for(dht_prefix: str, models_dir: Path) -> Path | None:
    """The folder of ``models_dir`` whose name maps to ``dht_prefix``
    (:func:`~farmesh_ws.models.dht_prefix_for`) and that holds a ``config.json``, or None.
    Hidden and partial folders (a name starting with ``.``) never count."""
    if not models_dir.is_dir():
        return None
    for folder in sorted(models_dir.iterdir()):
        if folder.name.startswith(".") or not (folder / "config.json").is_file():
            continue
        try:
            if dht_prefix_for(folder.name) == dht_prefix:
                return folder
        except ValueError:
            continue
    return None


async def adopt_announced_models(
    backend: DiscoveringBackend, settings: Settings, models_dir: Path
) -> tuple[Settings, dict[str, Path]]:
    """Serve each announced, not yet served model whose client half is in ``models_dir``:
    load it into ``backend`` and add it to ``settings.models`` (model id = the folder's name).
    Returns the new settings and the adopted folders by model id. A model that fails to load
    is logged and left unserved."""
    served = frozenset(terms.dht_prefix for terms in settings.models)
    adopted: dict[str, Path] = {}
    terms = list(settings.models)
    for prefix in await backend.announced():
        folder = None if prefix in served else local_folder_for(prefix, models_dir)
        if folder is None or folder.name in {t.model_id for t in terms}:
            continue
        try:
            await backend.add_model(ModelSpec(folder.name, folder, prefix))
        except Exception:
            logger.warning("announced model %s not loaded", folder.name, exc_info=True)
            continue
        logger.info("serving %s, announced in the DHT, from %s", folder.name, folder)
        terms.append(ModelTerms(folder.name, prefix, folder))
        adopted[folder.name] = folder
    return replace(settings, models=tuple(terms)), adopted
