"""Chunked per-token log-probs equal log_softmax on full logits (values and gradients), and per-sequence sums."""

import pytest
import torch

from lorakit.kernels.chunked_logps import chunked_token_logps, sequence_logps, token_logps_reference
from tests.conftest import make_tiny_llama


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_token_logps_matches_full_logits(softcap, bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    y = torch.randint(0, 50, (13,), generator=g)
    up = torch.randn(13, generator=g)  # a per-token upstream gradient, as a preference loss gives
    out = chunked_token_logps(h, w, y, b, chunk_size=4, logit_softcap=softcap)
    grads = torch.autograd.grad((out * up).sum(), [t for t in (h, w, b) if t is not None])
    ref = token_logps_reference(h, w, y, b, logit_softcap=softcap)
    ref_grads = torch.autograd.grad((ref * up).sum(), [t for t in (h, w, b) if t is not None])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_sequence_logps_chunked_equals_full_logits():
    model = make_tiny_llama()
    ids = torch.randint(2, 97, (3, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[2, 6:] = -100  # padding of a shorter row
    mask = (labels[:, :] != -100) | (torch.arange(8) < 4)
    kwargs = {"attention_mask": mask.long(), "position_ids": torch.arange(8).expand(3, 8)}
    chunked, n = sequence_logps(model, ids, labels, True, **kwargs)
    full, n_full = sequence_logps(model, ids, labels, False, **kwargs)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert n.tolist() == n_full.tolist() == [4, 4, 2]  # labels[t+1] counted from position t


def test_chunked_token_logps_under_bf16_autocast_backward_runs_and_is_close():
    """The backward recomputes the logits under the forward's autocast (bf16 hidden, fp32 head)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g)
    y = torch.randint(0, 40, (9,), generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        hb = h * 1.0  # a bf16 activation, as a decoder under autocast returns
        out = chunked_token_logps(hb.bfloat16(), w, y, chunk_size=4)
        (grad,) = torch.autograd.grad(out.sum(), h)
    ref = token_logps_reference(h, w, y)
    (ref_grad,) = torch.autograd.grad(ref.sum(), h)
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.1)  # bf16 logits: ~3 significant digits
    torch.testing.assert_close(grad, ref_grad, rtol=0.05, atol=0.05)
