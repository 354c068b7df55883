"""Assertions the tests share: two models that must be the same, tensor for tensor."""

import torch


def assert_identical(a, b, ids: torch.Tensor) -> None:
    """Same state-dict keys, dtypes and values, and bit-equal logits on ``ids``."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
