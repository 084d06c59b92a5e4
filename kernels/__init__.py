"""Compute kernels of the sink layer: pure-torch references (and, later, Triton versions).

Nothing here imports the rest of the project.
"""
