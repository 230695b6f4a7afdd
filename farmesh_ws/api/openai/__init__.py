"""OpenAI-compatible HTTP API (http.md): ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``. A wire adapter only: :mod:`.wire` decodes OpenAI's request bodies into engine
requests, :mod:`.objects` encodes results and errors in OpenAI's shapes, :mod:`.adapter` runs
them on the engine; every rule (limits, caps, rate limits, holds, billing) is the engine's."""
