"""Benchmarks and their harnesses (never imported by the runtime; see DESIGN.md, layout)."""
