"""Evaluation on labelled samples, and per-tenant score calibration from reviewer decisions."""
