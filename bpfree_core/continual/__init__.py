"""Continual learning: task streams and their measures (stream), EWC and SI inside a layer
(consolidation), A-GEM's projection (agem)."""
