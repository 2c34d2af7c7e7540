"""Benchmarks of kvmsys on its built-in guests: ``python -m benchmarks`` or ``kvmsys bench``.

One module per suite; ``harness`` holds the shared measurement rules
(interleaved repetitions, medians with min–max spread, ratios from paired
samples, the machine record) and ``report`` turns results into Markdown, JSON
and an optional plot.
"""
