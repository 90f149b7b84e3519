"""The shapes world: a synthetic video world, its detectors, and a small SD-format model trained on it."""
