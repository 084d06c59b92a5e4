"""Training: packing, loop, engines, tracking."""
