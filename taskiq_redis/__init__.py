"""Redis brokers, result backends and schedule sources for taskiq."""
