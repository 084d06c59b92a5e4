"""``nulls eval``: does forgetting by sinks match retraining without the source? Per-source losses in
every deployment mode against a retrained oracle, memorisation removed, VerbMem, Truth Ratio on cloze
probes, PrivLeak, forget quality, relearning, and post-hoc baselines (METHOD.md sections 3 and 6)."""
