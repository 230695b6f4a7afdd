"""The configured limits a request must respect (protocol.md §9), checked in one place.

Each check raises :class:`~farmesh_ws.errors.InvalidRequest` (or the named error) with a
message fit for the client; the limits are :class:`~farmesh_ws.config.Settings` fields.
"""

import asyncio
from collections.abc import Iterable

from farmesh_ws.config import Settings
from farmesh_ws.errors import ContextOverflow, InvalidRequest, MeshTimeout, ModelNotFound
from farmesh_ws.mesh.base import MeshBackend, MeshSession

MAX_MODEL_NAME_CHARS = 200


def check_text(settings: Settings, text: str, name: str) -> None:
    """``text`` has at most ``max_text_chars`` characters."""
    if len(text) > settings.max_text_chars:
        raise InvalidRequest(
            f"{name} has {len(text)} characters; the limit is {settings.max_text_chars}"
        )


def check_text_total(settings: Settings, texts: Iterable[str], name: str) -> None:
    """``texts`` (a conversation's messages) have at most ``max_text_chars`` characters in all."""
    total = sum(len(text) for text in texts)
    if total > settings.max_text_chars:
        raise InvalidRequest(
            f"{name} have {total} characters in all; the limit is {settings.max_text_chars}"
        )


def check_max_new_tokens(settings: Settings, value: int | None, model_id: str) -> None:
    """``value`` (None: the default) is at most the model's ``max_new_tokens_limit``."""
    limit = settings.max_new_tokens_limit_for(model_id)
    if value is not None and value > limit:
        raise InvalidRequest(f"max_new_tokens {value} is above the limit {limit} of {model_id}")


def check_max_length(settings: Settings, value: int, model_id: str) -> None:
    """A session's ``max_length`` is at most the model's ``max_length_limit``."""
    limit = settings.max_length_limit_for(model_id)
    if value > limit:
        raise InvalidRequest(f"max_length {value} is above the limit {limit} of {model_id}")


def default_max_new_tokens(settings: Settings, model_id: str) -> int:
    """``default_max_new_tokens``, lowered to the model's own limit."""
    return min(settings.default_max_new_tokens, settings.max_new_tokens_limit_for(model_id))


def default_max_length(settings: Settings, model_id: str) -> int:
    """``default_max_length``, lowered to the model's own limit."""
    return min(settings.default_max_length, settings.max_length_limit_for(model_id))


def check_room(mesh: MeshSession, token_ids: list[int]) -> None:
    """The session has room for its pending token and ``token_ids``; raises
    :class:`ContextOverflow` (protocol.md §5)."""
    needed = mesh.pending_tokens + len(token_ids)
    if mesh.position + needed > mesh.max_length:
        raise ContextOverflow.session_full(
            position=mesh.position, needed=needed, max_length=mesh.max_length
        )


def check_model(backend: MeshBackend, model_id: str) -> None:
    """The mesh serves ``model_id``; raises :class:`ModelNotFound`."""
    if model_id not in backend.model_ids:
        raise ModelNotFound(f"model {model_id[:MAX_MODEL_NAME_CHARS]!r} is not served here")


async def open_mesh_session(
    backend: MeshBackend, model_id: str, max_length: int, settings: Settings
) -> MeshSession:
    """Open a mesh session of a served model under ``open_timeout_s``; raises
    :class:`ModelNotFound`, :class:`InvalidRequest` or :class:`MeshTimeout`."""
    check_model(backend, model_id)
    check_max_length(settings, max_length, model_id)
    opening = backend.open_session(model_id, max_length=max_length)
    try:
        return await asyncio.wait_for(opening, settings.open_timeout_s)
    except TimeoutError:
        raise MeshTimeout("the mesh did not open a session in time") from None
