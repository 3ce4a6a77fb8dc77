"""Brokers: one module per broker type, each written once for every topology."""
