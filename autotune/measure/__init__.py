"""Measuring: the quick workload probe of a few samples, and one steady-state trial."""
