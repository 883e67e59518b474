"""token_logprobs: chunked + checkpointed LM-head log-probs equal the plain full-logits math, in less memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dash_exp.logprobs import auto_chunk, token_logprobs
from dash_exp.tracking import peak_allocated_bytes

H, V, N = 16, 50, 37


def reference(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, temperature: float):
    """The plain math: all [N, V] logits at once, upcast, / temperature, gather - logsumexp."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def grads(loss: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, tensors)


@pytest.mark.unit
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 100, None])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_full_logits_values_and_grads(chunk, temperature, bias):
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(H, V, bias=bias, dtype=torch.float64)
    hidden = torch.randn(N, H, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(V, (N,), generator=gen)
    w = torch.randn(N, dtype=torch.float64, generator=gen)
    params = [hidden, *head.parameters()]

    logp = token_logprobs(hidden, head, targets, temperature, chunk=chunk)
    ref = reference(hidden, head.weight, head.bias, targets, temperature)
    assert logp.dtype == torch.float64 and logp.shape == (N,)
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-9)
    if chunk is None or chunk >= N:  # unchunked: the very same ops
        assert torch.equal(logp, ref)
    for got, want in zip(grads((logp * w).sum(), *params), grads((ref * w).sum(), *params), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.unit
@pytest.mark.parametrize("chunk", [1, 6, None])
def test_tied_embedding_grad_accumulates(chunk):
    """head.weight is the embedding's Parameter, which also produces the hidden states and another loss term."""
    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.Embedding(V, H, dtype=torch.float64)
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    head.weight = emb.weight
    mix = torch.randn(H, H, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.randint(V, (N,), generator=gen)
    targets = torch.randint(V, (N,), generator=gen)
    w = torch.randn(N, dtype=torch.float64, generator=gen)
    other = torch.randint(V, (5,), generator=gen)

    def loss(fn):
        hidden = torch.tanh(emb(ids) @ mix)
        return (fn(hidden) * w).sum() + emb(other).square().sum()

    got = grads(loss(lambda h: token_logprobs(h, head, targets, 0.7, chunk=chunk)), emb.weight, mix)
    want = grads(loss(lambda h: reference(h, emb.weight, None, targets, 0.7)), emb.weight, mix)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-9)


@pytest.mark.unit
def test_frozen_hidden_grads_reach_head_only():
    gen = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    hidden = torch.randn(N, H, dtype=torch.float64, generator=gen)
    targets = torch.randint(V, (N,), generator=gen)
    (got,) = grads(token_logprobs(hidden, head, targets, chunk=4).sum(), head.weight)
    (want,) = grads(reference(hidden, head.weight, None, targets, 1.0).sum(), head.weight)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.unit
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_no_grad_same_values(chunk):
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(H, V, dtype=torch.float64)
    hidden = torch.randn(N, H, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(V, (N,), generator=gen)
    with torch.no_grad():
        logp = token_logprobs(hidden, head, targets, 0.7, chunk=chunk)
        ref = reference(hidden, head.weight, head.bias, targets, 0.7)
    assert logp.grad_fn is None and not logp.requires_grad
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-9)


@pytest.mark.unit
def test_leading_dims_are_kept():
    gen = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(H, V, dtype=torch.float64)
    hidden = torch.randn(3, 7, H, dtype=torch.float64, generator=gen)
    targets = torch.randint(V, (3, 7), generator=gen)
    logp = token_logprobs(hidden, head, targets, chunk=4)
    assert logp.shape == (3, 7)
    torch.testing.assert_close(
        logp.reshape(-1),
        reference(hidden.reshape(-1, H), head.weight, head.bias, targets.reshape(-1), 1.0),
        rtol=0,
        atol=1e-9,
    )


@pytest.mark.unit
@pytest.mark.parametrize("chunk", [0, -3])
def test_bad_chunk_raises(chunk):
    head = torch.nn.Linear(H, V)
    with pytest.raises(ValueError, match=r"model\.logprob_chunk"):
        token_logprobs(torch.randn(N, H), head, torch.zeros(N, dtype=torch.long), chunk=chunk)


@pytest.mark.unit
def test_auto_chunk():
    assert auto_chunk(151_936) == 441  # ~256 MiB of fp32 logits per chunk for Qwen2.5
    assert auto_chunk(100) >= 100_000  # a tiny vocab is effectively unchunked
    assert auto_chunk(2**30) == 1


def _measure(chunk: int, hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, w: torch.Tensor):
    """(bytes saved for backward, outside any checkpoint; peak live bytes allocated during forward + backward)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # a storage saved twice counts once
        return t

    hidden.grad = head.weight.grad = None

    def forward_backward() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = (token_logprobs(hidden, head, targets, chunk=chunk) * w).sum()
        loss.backward()

    peak = peak_allocated_bytes(forward_backward, hidden.device)
    assert peak > 0, "the profiler recorded no CPU memory events"
    return sum(storages.values()), peak


@pytest.mark.integration
def test_chunking_bounds_memory():
    """Qwen2.5's vocab: the full [N, V] logits (and their grads) at once vs chunks of N / 8 tokens.

    Peak live bytes: full ~4 x [N, V] fp32 (logits, exp, grad, gather's scatter); chunked ~4 x [chunk, V] plus the
    head's weight grad (~3 x [V, H] while accumulating). N is kept small so the test takes seconds on 2 cores.
    """
    n, h, v, chunk = 256, 64, 151_936, 32
    gen = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(h, v, bias=False)
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    targets = torch.randint(v, (n,), generator=gen)
    w = torch.randn(n, generator=gen)

    full_saved, full_peak = _measure(n, hidden, head, targets, w)
    full_grads = hidden.grad.clone(), head.weight.grad.clone()
    chunk_saved, chunk_peak = _measure(chunk, hidden, head, targets, w)
    mib, chunk_logits, weight = 2**20, chunk * v * 4, v * h * 4
    print(
        f"\nsaved for backward: full {full_saved / mib:.1f} MiB, chunked {chunk_saved / mib:.2f} MiB; "
        f"peak live during fwd+bwd: full {full_peak / mib:.1f} MiB, chunked {chunk_peak / mib:.1f} MiB "
        f"({full_peak / chunk_peak:.1f}x); one chunk's logits {chunk_logits / mib:.1f} MiB, "
        f"weight {weight / mib:.1f} MiB"
    )
    assert full_saved >= n * v * 4  # sanity: the full version keeps its logits for backward
    assert chunk_saved * 4 <= full_saved
    assert chunk_peak * 4 <= full_peak
    assert chunk_peak <= 5 * chunk_logits + 3 * weight  # O(chunk x V) + O(V x H), whatever N
    torch.testing.assert_close((hidden.grad, head.weight.grad), full_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.unit
def test_bf16_autocast_chunked_matches_unchunked():
    gen = torch.Generator().manual_seed(6)
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(N, H, generator=gen, requires_grad=True)
    targets = torch.randint(V, (N,), generator=gen)
    w = torch.randn(N, generator=gen)
    results = []
    for chunk in (N, 7):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = token_logprobs(hidden, head, targets, 0.7, chunk=chunk)
        assert logp.dtype == torch.float32
        # backward outside autocast, as in training: the checkpoint recomputes each chunk under the saved autocast
        results.append((logp.detach(), *grads((logp * w).sum(), hidden, head.weight)))
    (full, *full_grads), (chunked, *chunked_grads) = results
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-2)
    for got, want in zip(chunked_grads, full_grads, strict=True):
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    # and the bf16 head really ran: the values differ from the fp32 ones
    with torch.no_grad():
        assert not torch.allclose(full, reference(hidden, head.weight, None, targets, 0.7), rtol=0, atol=1e-6)


@pytest.mark.unit
def test_bf16_autocast_head_grad_not_noisier_when_chunked():
    """Many chunks: the head weight's grad sums them in fp32 (not in one shared bf16 cast of the weight)."""
    n, h, v = 2048, 32, 200
    gen = torch.Generator().manual_seed(7)
    head = torch.nn.Linear(h, v, bias=False)
    hidden = torch.randn(n, h, generator=gen)
    targets = torch.randint(v, (n,), generator=gen)
    w = torch.randn(n, generator=gen)
    ref = reference(hidden.double(), head.weight.double(), None, targets, 0.7)
    (exact,) = grads((ref * w.double()).sum(), head.weight)

    def error(chunk: int) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = token_logprobs(hidden, head, targets, 0.7, chunk=chunk)
        (got,) = grads((logp * w).sum(), head.weight)
        return float((got.double() - exact).norm() / exact.norm())

    unchunked, chunked = error(n), error(32)
    assert chunked < 1.5 * unchunked, (chunked, unchunked)
