"""Counting and measuring: MACs, parameters, timing."""
