"""Wire adapters: decode a surface's messages, call the engine, encode its results."""
