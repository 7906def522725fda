"""The evaluation input: every record once, in order, the last batch partial (numpy reference)."""

import numpy as np

from ctglip_jax.eval_inputs import every_record_once


def test_every_record_once_keeps_order_and_the_partial_last_batch():
    examples = [{"image": np.full((2, 2), i, np.float32), "case_id": f"c{i}"} for i in range(8)]
    batches = list(every_record_once(iter(examples), 3))
    assert [len(b["image"]) for b in batches] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]),
                                  np.stack([e["image"] for e in examples]))
    assert [c for b in batches for c in b["case_id"]] == [f"c{i}" for i in range(8)]
    assert list(every_record_once([], 4)) == []


def test_every_record_once_with_its_own_stacking():
    """Pipelines of batch one are regrouped by concatenation (the fine-tuning evaluation crops)."""
    ones = [{"x": np.array([[i]])} for i in range(5)]
    batches = list(every_record_once(ones, 2, lambda chunk: {"x": np.concatenate([b["x"] for b in chunk])}))
    assert [b["x"][:, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
