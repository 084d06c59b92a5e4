"""The files ``nulls export --mode routed`` writes into the exported folder: they import only torch
and transformers, so that ``trust_remote_code=True`` loads the model without this package."""
