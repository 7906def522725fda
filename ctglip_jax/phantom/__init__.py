"""The synthetic full-body phantom: the default data, since no real patient data is reachable here.

Kept apart from `data/` because only the phantom's own dataset (`ctglip_synthetic`) may use it: training,
evaluation and inference import it where the dataset *is* the phantom (the builder, the phantom's
abnormality dictionary, its finding labels), never for user data, whose dictionary and labels come from the
user's corpus. `tests/test_import_graph.py` holds that to the import graph.
"""
