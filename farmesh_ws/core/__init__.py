"""The pure core: request values, money and settlement (no I/O, no ML stack)."""
