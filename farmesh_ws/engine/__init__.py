"""The request engine: conversations, admission, mesh lifecycle and settlement for every surface."""
