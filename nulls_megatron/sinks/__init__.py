"""The sink core: assignment, routing, sink table and NULLs MLP, in plain torch."""
