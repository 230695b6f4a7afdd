"""Usage and payment records: exact $FAR amounts and how a turn's cost is split."""
