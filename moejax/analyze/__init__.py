"""Routing analysis: which experts take which tokens, per domain and layer.

`python -m moejax.analyze --workdir RUN --out REPORT` writes routing.json, PNG plots and index.html
(see docs/analysis.md). `collect` runs a model and tallies its routing, `stats` holds the numpy
measures, `plots` and `report` draw them. The training loop logs `routing_metrics` at each eval.
"""
from moejax.analyze.collect import routing_metrics

__all__ = ["routing_metrics"]
