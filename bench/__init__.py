"""Benchmarks of sam2unet-assist: how close to the hardware it runs and where the time goes.

``python -m bench`` runs every section and writes ``bench/results/latest.{md,json}``; see
docs/benchmarks.md.
"""
