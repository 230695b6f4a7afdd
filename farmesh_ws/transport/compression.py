"""permessage-deflate (RFC 7692) as the gateway negotiates it, from :class:`Settings`.

``ws_compression`` chooses one of three modes:

- ``deflate`` (default): the server keeps its compression context between messages
  (``server_max_window_bits`` = ``ws_deflate_window_bits``, zlib ``memLevel`` =
  ``ws_deflate_mem_level``), so a stream of similar token frames shrinks to a few bytes each;
  it asks the client for ``client_no_context_takeover`` (RFC 7692 §7.1.1.1), so the server
  keeps no decompressor between the client's rare, small messages.
  ``client_max_window_bits`` is the same number when the client offers it.
- ``stateless``: no context takeover either way: nothing is kept per connection between
  messages, and each message is compressed on its own (small frames barely shrink).
- ``off``: no extension is negotiated.

What it costs: with a kept context zlib holds, per connection, a ``2**(window_bits + 2)``
byte window and hash chain, ``2**(mem_level + 9)`` bytes of hash table and pending buffer and
~6 KiB of state (zlib.h, ``deflateInit2``). Measured with ``scripts/bench_ws.py`` (README
"WebSocket compression"): 10,000 idle sessions cost 394 MiB above the gateway's base with the
defaults, 303 MiB ``stateless``, 576 MiB with websockets' default (12 window bits, memLevel 5,
both contexts kept); token frames shrink from ~100 bytes to 14 with a kept context, to 82
without.
"""

from typing import TYPE_CHECKING, Final

from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

if TYPE_CHECKING:  # config imports COMPRESSION_MODES from here
    from farmesh_ws.config import Settings

COMPRESSION_MODES: Final = ("deflate", "stateless", "off")


def server_extensions(settings: "Settings") -> list[ServerExtensionFactory]:
    """The extension factories to pass to ``websockets.serve(extensions=...)`` (with
    ``compression=None``); empty for ``off``."""
    if settings.ws_compression == "off":
        return []
    stateless = settings.ws_compression == "stateless"
    bits = settings.ws_deflate_window_bits
    return [
        ServerPerMessageDeflateFactory(
            server_no_context_takeover=stateless,
            client_no_context_takeover=True,
            server_max_window_bits=bits,
            client_max_window_bits=bits,
            compress_settings={"memLevel": settings.ws_deflate_mem_level},
        )
    ]
