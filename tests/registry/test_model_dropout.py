"""Attention dropout in the model attention function: BERT fine-tuning on triton_attn.

A tiny ``BertForSequenceClassification`` whose only randomness is attention dropout (hidden and classifier
dropout 0). Our dropout draws another random stream than sdpa's, so single losses differ; over many seeds the
two loss distributions must agree: the means within a bound derived from the samples (4 standard errors of
their difference) and the spreads within a factor of 2. The first layer's attention output, whose input has
no randomness, is unbiased: its projection on the eval output averages to exactly that output's (dropout
keeps a probability with chance 1 - p and scales it by 1 / (1 - p)), within 4 standard errors -- a tight
check (about 0.3% here) that a wrong scale would fail. Eval mode has no dropout: the losses are equal, and a
dropout probability of 0 in train mode equals eval mode.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("transformers_registered")  # tests/registry/conftest.py

VOCAB, BATCH, SEQ, SEEDS, DROPOUT = 96, 4, 20, 30, 0.1


def _model():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=DROPOUT, initializer_range=0.3, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification._from_config(config, attn_implementation="triton_attn")


def _batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=generator)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, 14:] = 0  # right padding: the padding mask and dropout together
    attention_mask[3, 9:] = 0
    labels = torch.randint(0, 3, (BATCH,), generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _losses(model, implementation: str, batch, seeds, first_attention: Optional[list] = None) -> torch.Tensor:
    """float64 ``[len(seeds)]``: the loss after ``torch.manual_seed(seed)``; ``first_attention`` collects the
    first layer's attention output ``[B, L, hidden]`` of each call."""
    model.set_attn_implementation(implementation)
    attention = model.bert.encoder.layer[0].attention.self
    hook = None if first_attention is None else \
        attention.register_forward_hook(lambda module, inputs, output: first_attention.append(output[0]))
    losses = []
    try:
        with torch.no_grad():
            for seed in seeds:
                torch.manual_seed(seed)
                losses.append(float(model(**batch).loss))
    finally:
        if hook is not None:
            hook.remove()
    return torch.tensor(losses, dtype=torch.float64)


def _within(samples: torch.Tensor, expected: float, standard_errors: float = 4.0) -> bool:
    return abs(float(samples.mean()) - expected) <= standard_errors * float(samples.std()) / math.sqrt(len(samples))


def test_bert_dropout_loss_distribution_matches_sdpa():
    model, batch = _model(), _batch()
    without_dropout: list = []
    _losses(model.eval(), "sdpa", batch, [0], without_dropout)
    reference = without_dropout[0]
    model.train()
    losses, projections = {}, {}
    for offset, name in enumerate(("triton_attn", "sdpa")):
        outputs: list = []
        losses[name] = _losses(model, name, batch, range(offset * SEEDS, (offset + 1) * SEEDS), outputs)
        projections[name] = torch.stack([(out * reference).sum() / (reference * reference).sum()
                                         for out in outputs]).double()
    ours, theirs = losses["triton_attn"], losses["sdpa"]
    assert ours.std() > 1e-4 and theirs.std() > 1e-4  # dropout is applied: the loss varies with the seed
    standard_error = math.sqrt(ours.var() / SEEDS + theirs.var() / SEEDS)
    assert abs(ours.mean() - theirs.mean()) <= 4 * standard_error, (ours.mean(), theirs.mean(), standard_error)
    assert 0.5 <= ours.std() / theirs.std() <= 2.0, (ours.std(), theirs.std())
    for name, projection in projections.items():  # E[dropout output] = the output without dropout, exactly
        assert _within(projection, 1.0), (name, projection.mean(), projection.std())
    # The same seed gives the same dropout pattern (the seed comes from torch's generator).
    assert torch.equal(_losses(model, "triton_attn", batch, [3, 3]), ours[[3, 3]])


def test_bert_train_step_runs_and_eval_matches_sdpa():
    model, batch = _model(), _batch()
    model.train()
    model.set_attn_implementation("triton_attn")
    torch.manual_seed(0)
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().max() > 0
    model.zero_grad()

    model.eval()
    evaluated = {name: _losses(model, name, batch, [0]) for name in ("triton_attn", "sdpa")}
    torch.testing.assert_close(evaluated["triton_attn"], evaluated["sdpa"], atol=1e-5, rtol=1e-5)

    # Dropout probability 0 in train mode is eval mode, gradients included (sdpa's as the reference).
    model.train()
    for layer in model.bert.encoder.layer:
        layer.attention.self.dropout.p = 0.0
    grads = {}
    for name in ("triton_attn", "sdpa"):
        model.set_attn_implementation(name)
        loss = model(**batch).loss
        torch.testing.assert_close(loss.detach().double(), evaluated["sdpa"][0], atol=1e-5, rtol=1e-5)
        loss.backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
    for ours, theirs in zip(grads["triton_attn"], grads["sdpa"]):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
