"""farmesh_ws: a WebSocket session gateway in front of a Petals/Hivemind inference mesh."""

__version__ = "0.1.0"
