"""Benchmarks: scripts that write a JSON result and a markdown table."""
