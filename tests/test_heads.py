"""The fusion's attention: its folded computation is `nn.MultiheadAttention` itself, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moon_rl.modeling.heads import ModalityFusion


def reference(attn: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torch's own module over the unmasked keys (a row without keys: zeros)."""
    present = mask.any(dim=1)
    safe = mask.clone()
    safe[~present, 0] = True
    out, _ = attn(query[:, None], keys, keys, key_padding_mask=~safe, need_weights=False)
    return out[:, 0] * present[:, None]


@pytest.mark.parametrize("num_heads", [1, 4])
def test_folded_attention_is_multihead_attention(num_heads):
    torch.manual_seed(0)
    hidden, rows, length = 32, 5, 7
    attn = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
    for param in attn.parameters():  # biases too: the folding drops b_k (it cancels) and keeps b_v
        nn.init.normal_(param, std=0.3)
    query = torch.randn(rows, hidden, requires_grad=True)
    keys = torch.randn(rows, length, hidden, requires_grad=True)
    mask = torch.rand(rows, length) > 0.4
    mask[0] = True
    mask[1] = False  # no keys at all
    mask[2] = False
    mask[2, -1] = True  # one key, the last: the mask, not the order, decides what a row sees

    got, present = ModalityFusion._attend(attn, query, keys, mask)
    expected = reference(attn, query, keys, mask)

    assert present.tolist() == mask.any(1).tolist() and not present[1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], torch.zeros(hidden))
    # Row 2 sees one key: its output is that key's value through the output projection, whatever the scores.
    w_v, b_v = attn.in_proj_weight[2 * hidden:], attn.in_proj_bias[2 * hidden:]
    torch.testing.assert_close(got[2], attn.out_proj(keys[2, -1] @ w_v.T + b_v), atol=1e-5, rtol=1e-5)

    weights = torch.randn_like(expected)
    inputs = [query, keys, *attn.parameters()]
    want = torch.autograd.grad((expected * weights).sum(), inputs)
    have = torch.autograd.grad((got * weights).sum(), inputs)
    for name, a, b in zip(["query", "keys", *[n for n, _ in attn.named_parameters()]], have, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


def test_masked_keys_do_not_change_the_output():
    torch.manual_seed(1)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    query, keys = torch.randn(2, 16), torch.randn(2, 6, 16)
    mask = torch.tensor([[True, True, True, False, False, False]] * 2)
    before, _ = ModalityFusion._attend(attn, query, keys, mask)
    keys[:, 3:] = 100.0  # what a padded position holds must not matter
    after, _ = ModalityFusion._attend(attn, query, keys, mask)
    torch.testing.assert_close(before, after)
