"""The checks of the architecture sweep (``architecture_sweep``): one model, ours against its reference.

Each check takes a built model (random float32 weights, ``attn_implementation="triton_attn"``), runs
something with ours, switches the same model to its reference (``switch_to_reference``: ``sdpa``, or
``eager`` where the model or one of its sub-models has no sdpa) and compares:

- ``check_logits``: a padded batch ``[BATCH, SEQ]`` in eval mode; the logits of real tokens differ by at
  most ``LOGITS_RTOL`` of the reference's largest logit;
- ``check_gradients``: train mode (the tiny configs set every dropout probability to 0), a right-padded
  batch as in training; every parameter's gradient of a fixed random projection of the real tokens' logits
  differs by at most ``GRAD_RTOL`` of that gradient's largest magnitude plus ``GRAD_FLOOR`` of the largest
  gradient of the model;
- ``check_generate``: greedy ``generate()`` of ``NEW_TOKENS`` tokens on the padded batch: the same tokens.

A mismatch beyond those tolerances is checked against a float64 run of the reference before it fails: ours
passes when its error is at most 2x (logits) / 3x (gradients) the reference's own float32 error (the
project's numerics rule), so that ill-conditioned models (float32 noise larger than the tolerance) do not
fail for the reference's rounding. Every check asserts that our attention function ran (a model that
accepts the name but never calls the interface would pass vacuously) and that the reference run did not.
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Tuple

import torch

if TYPE_CHECKING:
    from .architecture_sweep import Architecture

OURS = "triton_attn"
SEQ, BATCH, PAD = 12, 2, 3   # PAD: padded tokens of batch row 0
DECODER_SEQ, NEW_TOKENS = 7, 4
LOGITS_RTOL, GRAD_RTOL, GRAD_FLOOR = 1e-4, 1e-3, 1e-4


def switch_to_reference(model) -> str:
    """Set ``model`` to ``sdpa``, or ``eager`` where it (or one of its sub-models) has no sdpa; returns which."""
    try:
        model.set_attn_implementation("sdpa")
        return "sdpa"
    except ValueError:  # transformers: "... does not support an attention implementation through sdpa"
        model.set_attn_implementation("eager")
        return "eager"


class CallCounter:
    """Counts calls of our attention function made by transformers models; ``reference``: the implementation
    the last comparison ran against."""

    def __init__(self):
        self.calls = 0
        self.reference: Optional[str] = None


@contextlib.contextmanager
def registered(wrap: Optional[Callable[[Callable], Callable]] = None) -> Iterator[CallCounter]:
    """``triton_attn`` registered in transformers (counting its calls; ``wrap(function)`` replaces our attention
    function, for negative controls); every global mapping restored afterwards."""
    import transformers

    from triton_attn.registry import register_transformers

    mappings = (transformers.AttentionInterface._global_mapping, transformers.AttentionMaskInterface._global_mapping)
    saved = [dict(mapping) for mapping in mappings]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    register_transformers(OURS)
    counter, ours = CallCounter(), mappings[0][OURS]
    ours = ours if wrap is None else wrap(ours)

    def counted(*args, **kwargs):
        counter.calls += 1
        return ours(*args, **kwargs)

    mappings[0][OURS] = counted
    try:
        yield counter
    finally:
        transformers.logging.set_verbosity(verbosity)
        for mapping, old in zip(mappings, saved):
            mapping.clear()
            mapping.update(old)


def _token_ids(config) -> set:
    """Every special token id of ``config`` and its sub-configs (inputs avoid them: an image token wants pixels)."""
    ids = set()
    for name, value in vars(config).items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            ids |= _token_ids(value)
        elif re.search(r"_(token_id|token_index|token_ids|id)$", name):
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and not isinstance(v, bool):
                    ids.add(v)
    return ids


def _vocab_size(config) -> int:
    for candidate in (config, getattr(config, "get_text_config", lambda **_: config)(decoder=True)):
        vocab = getattr(candidate, "vocab_size", None)
        if isinstance(vocab, int):
            return vocab
    raise ValueError(f"{type(config).__name__} has no vocab_size")


def make_inputs(arch: "Architecture", model, left: Optional[bool] = None) -> Tuple[dict, torch.Tensor]:
    """(model inputs, real: bool [BATCH, L] of the logits positions compared). ``input_ids`` [BATCH, SEQ]
    avoid every special token id (an image token would want pixels); row 0 has PAD padded tokens: on the
    left (``left``; default: for decoders, as generate() pads) or on the right (encoders; training batches).
    An encoder-decoder also gets unpadded ``decoder_input_ids`` [BATCH, DECODER_SEQ], whose logits are
    compared."""
    config = model.config
    vocab = _vocab_size(config)
    special = _token_ids(config)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    generator = torch.Generator().manual_seed(1)
    ids = allowed[torch.randint(len(allowed), (BATCH, SEQ), generator=generator)]
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    pad = pad_id(config)
    if left is None:
        left = arch.task != "masked" and not config.is_encoder_decoder
    padded = slice(0, PAD) if left else slice(SEQ - PAD, SEQ)
    attention_mask[0, padded] = 0
    ids[0, padded] = pad
    inputs = dict(input_ids=ids, attention_mask=attention_mask)
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = allowed[torch.randint(len(allowed), (BATCH, DECODER_SEQ), generator=generator)]
        return inputs, torch.ones(BATCH, DECODER_SEQ, dtype=torch.bool)
    return inputs, attention_mask.bool()


def pad_id(config) -> int:
    """The config's pad token id, else 0 (padded positions are masked: their id only has to exist)."""
    pad = getattr(config, "pad_token_id", None)
    return pad if isinstance(pad, int) and not isinstance(pad, bool) else 0


def _logits(model, inputs: dict) -> torch.Tensor:
    out = model(**inputs, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _run_both(arch: "Architecture", model, counter: CallCounter, run: Callable[[], object]):
    """``run()`` with ours, then with the reference; asserts ours ran only in the first."""
    model.set_attn_implementation(OURS)
    before = counter.calls
    ours = run()
    assert counter.calls > before, f"{arch.id}: our attention function never ran"
    reference = counter.reference = switch_to_reference(model)
    after = counter.calls
    expected = run()
    assert counter.calls == after, f"{arch.id}: our attention function ran under {reference}"
    return ours, expected


def _mismatches(ours: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], rtol: float,
                floor_rtol: float) -> List[Tuple[float, str, float, float]]:
    """(error / tolerance, name, error, largest) of each tensor of ``ours`` further from ``expected`` than
    ``rtol`` of the latter's largest magnitude plus ``floor_rtol`` of the largest magnitude of all of them."""
    floor = floor_rtol * max(g.abs().max().item() for g in expected.values())
    found = []
    for name, g in expected.items():
        error, scale = (ours[name] - g).abs().max().item(), g.abs().max().item()
        tolerance = rtol * scale + floor
        if not error <= tolerance:  # NaN fails too
            found.append((error / max(tolerance, 1e-30), name, error, scale))
    return found


def _golden_rescue(found, ours, expected, golden, factor: float) -> list:
    """Of ``found`` mismatches, those that the float64 ``golden`` does not explain: ours further from it than
    ``factor`` times the reference's float32 error (plus a small floor). An ill-conditioned model (MobileBERT's
    unnormalised layers) makes float32 runs of the same maths differ; the reference then errs as much."""
    still = []
    for item in found:
        name = item[1]
        gold = golden[name]
        ours_error = (ours[name].double() - gold).abs().max().item()
        reference_error = (expected[name].double() - gold).abs().max().item()
        if not ours_error <= factor * reference_error + 1e-6 * gold.abs().max().item():
            still.append(item)
    return still


def _describe(arch: "Architecture", what: str, found, total: int) -> str:
    ratio, name, error, scale = max(found)
    return f"{arch.id}: {len(found)} of {total} {what} differ; worst {name}: {error:.3g} (largest {scale:.3g})"


def check_logits(arch: "Architecture", model, counter: CallCounter) -> None:
    """Eval-mode logits of the padded batch's real tokens (see the module docstring)."""
    model.eval()
    inputs, real = make_inputs(arch, model)

    def logits(m=model):
        with torch.no_grad():
            return {"logits": _logits(m, inputs)[real]}

    ours, expected = _run_both(arch, model, counter, logits)
    assert torch.isfinite(expected["logits"]).all(), f"{arch.id}: the reference logits are not finite"
    found = _mismatches(ours, expected, 0.0, LOGITS_RTOL)
    if found:
        found = _golden_rescue(found, ours, expected, logits(copy.deepcopy(model).double()), 2.0)
    assert not found, _describe(arch, "logits", found, 1)


def check_gradients(arch: "Architecture", model, counter: CallCounter) -> None:
    """Train-mode gradients of every parameter (see the module docstring), on a right-padded batch as in
    training: left padding gives padded query rows with no key to attend, which some models turn into NaN
    gradients that poison every parameter's (Gemma 3n, with sdpa as with ours; eager stays finite)."""
    model.train()
    inputs, real = make_inputs(arch, model, left=False)
    probe = []

    def grads(m=model):
        m.zero_grad(set_to_none=True)
        logits = _logits(m, inputs)[real]
        if not probe:  # one fixed random projection of the logits: every logit matters
            probe.append(torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)))
        (logits * probe[0].to(logits.dtype)).sum().backward()
        return {name: p.grad.detach().clone() for name, p in m.named_parameters() if p.grad is not None}

    ours, expected = _run_both(arch, model, counter, grads)
    assert ours.keys() == expected.keys(), f"{arch.id}: parameters with gradients differ: " \
        f"{sorted(ours.keys() ^ expected.keys())[:5]}"
    expected = {name: g for name, g in expected.items() if g.numel()}
    found = _mismatches(ours, expected, GRAD_RTOL, GRAD_FLOOR)
    if found:
        found = _golden_rescue(found, ours, expected, grads(copy.deepcopy(model).double()), 3.0)
    assert not found, _describe(arch, "gradients", found, len(expected))


def check_generate(arch: "Architecture", model, counter: CallCounter) -> None:
    """Greedy generate() on the padded batch (prefill and decode steps with one query): the same tokens."""
    model.eval()
    inputs, _ = make_inputs(arch, model)
    inputs.pop("decoder_input_ids", None)
    pad = pad_id(model.config)
    # Set on the generation config: custom generate() methods (MusicGen's delay pattern) read them there.
    model.generation_config.pad_token_id = pad
    if model.generation_config.decoder_start_token_id is None:
        model.generation_config.decoder_start_token_id = pad
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                   num_return_sequences=1)
    with torch.no_grad():
        ours, expected = _run_both(arch, model, counter, lambda: model.generate(**inputs, **options))
    assert torch.equal(ours, expected), f"{arch.id}: greedy tokens differ:\n{ours}\n{expected}"


CHECK_FUNCTIONS = {"logits": check_logits, "gradients": check_gradients, "generate": check_generate}


