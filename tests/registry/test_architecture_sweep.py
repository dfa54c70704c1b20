"""The architecture sweep: every causal-LM, masked-LM and seq2seq class of the installed transformers, on
triton_attn against transformers' own sdpa (eager where a model has none), on the same random weights.

What runs (see ``architecture_sweep`` for the list, the tiny configs and the exclusions, ``sweep_checks`` for
the comparisons):

- default: ``logits`` of every architecture (padded batch, float32), and ``gradients`` (every parameter) and
  ``generate`` (greedy tokens) of a deterministic sample of about one architecture in four, chosen by a hash
  of its id (``architecture_sweep.sampled``), so the same ones run on every machine and under xdist;
- ``TRITON_ATTN_SWEEP=all`` or ``pytest tests/registry --sweep-all``: every check of every architecture.

An excluded architecture (``architecture_sweep.EXCLUDED``, or computed: it never calls the attention
interface) is skipped with its reason. Failures of ours are ``KNOWN_FAILURES``, marked xfail.
``python -m tests.registry.architecture_sweep --markdown`` writes the results table (docs/architectures.md).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from . import architecture_sweep as sweep  # noqa: E402
from .sweep_checks import check_gradients, check_logits, registered  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")]

ARCHITECTURES = sweep.architectures()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads are pure overhead, and on a loaded machine 2 threads run several times
    slower than 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case(arch: sweep.Architecture, check: str):
    """One test case; a ``KNOWN_FAILURES`` entry makes it xfail (strict unless its fix is in flight)."""
    known = sweep.known_failure(arch, check)
    marks = [] if known is None else [pytest.mark.xfail(reason=known.reason, strict=known.strict)]
    return pytest.param(arch, check, id=f"{arch.id}-{check}", marks=marks)


def pytest_generate_tests(metafunc):
    if {"arch", "check"} <= set(metafunc.fixturenames):
        everything = sweep.sweep_everything(metafunc.config)
        metafunc.parametrize(("arch", "check"), [_case(arch, check) for arch in ARCHITECTURES
                                                 for check in sweep.CHECKS if sweep.selected(arch, check, everything)])


def test_architecture(arch, check):
    """One check of one architecture, ours against sdpa / eager (``sweep_checks``); excluded ones skip."""
    try:
        sweep.run_check(arch, check)
    except sweep.Excluded as reason:
        pytest.skip(str(reason))


def test_the_list_is_computed_from_transformers():
    """Every class of the three auto mappings is in the sweep, and the default-mode sample (about a quarter)
    holds masked, causal and seq2seq models."""
    from transformers.models.auto import modeling_auto

    ids = {arch.id for arch in ARCHITECTURES}
    for name in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                 "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"):
        for model_type, class_name in getattr(modeling_auto, name).items():
            names = class_name if isinstance(class_name, (list, tuple)) else (class_name,)
            assert {f"{model_type}:{n}" for n in names} <= ids
    assert {"llama:LlamaForCausalLM", "bert:BertForMaskedLM", "t5:T5ForConditionalGeneration"} <= ids
    sample = [arch for arch in ARCHITECTURES if sweep.sampled(arch)]
    assert {arch.task for arch in sample} == {"causal", "masked", "seq2seq"}
    assert 0.15 < len(sample) / len(ARCHITECTURES) < 0.35


def test_tables_name_real_architectures():
    """Every exclusion, override and known failure names a model type the installed transformers has
    (a renamed or removed one must not linger as a silent entry)."""
    model_types = {arch.model_type for arch in ARCHITECTURES}
    ids = {arch.id for arch in ARCHITECTURES}
    for table in (sweep.EXCLUDED, sweep.OVERRIDES, sweep.KNOWN_FAILURES, sweep.VARIANTS):
        for key in table:
            name = key.split("/")[0]
            assert name in model_types or name in ids, f"{key!r} names no architecture of transformers " \
                                                       f"{transformers.__version__}"
            if "/" in key:
                assert key.split("/")[1] in sweep.CHECKS, key


def test_tiny_configs_shrink_by_field_name():
    """The generic shrinking: sizes, counts, dropouts, derived head_dim; a hybrid model keeps an attention
    layer; special token ids move inside the tiny vocabulary."""
    from .tiny_configs import tiny_config

    llama = tiny_config(transformers.LlamaConfig, {"attention_dropout": 0.1})
    assert (llama.hidden_size, llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim,
            llama.num_hidden_layers, llama.vocab_size) == (64, 4, 2, 16, 2, 96)
    assert llama.attention_dropout == 0.1  # overrides come last
    assert tiny_config(transformers.BertConfig).attention_probs_dropout_prob == 0.0
    qwen_next = tiny_config(transformers.Qwen3NextConfig)
    assert set(qwen_next.layer_types) == {"linear_attention", "full_attention"}
    assert qwen_next.num_hidden_layers == len(qwen_next.layer_types)
    gpt2 = tiny_config(transformers.GPT2Config)
    assert gpt2.bos_token_id < gpt2.vocab_size and gpt2.eos_token_id < gpt2.vocab_size


def _drops_padding(attention_function):
    """A broken attention function: ignores the mask (every key attended, padding included)."""
    def broken(module, query, key, value, attention_mask, **kwargs):
        return attention_function(module, query, key, value, None, **{**kwargs, "is_causal": True})

    return broken


def _perturbs_key_gradient(attention_function):
    """A broken attention function: right forward, wrong key gradient (scaled by 1.01)."""
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, tensor):
            return tensor.view_as(tensor)

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    def broken(module, query, key, value, attention_mask, **kwargs):
        return attention_function(module, query, Scale.apply(key), value, attention_mask, **kwargs)

    return broken


@pytest.mark.parametrize("check, breaker", [("logits", _drops_padding), ("gradients", _perturbs_key_gradient)])
def test_the_checks_catch_a_broken_attention(check, breaker):
    """Negative controls: the comparisons fail for an attention function that ignores padding, or whose key
    gradient is off by 1%."""
    arch = next(a for a in ARCHITECTURES if a.id == "llama:LlamaForCausalLM")
    sweep.run_check(arch, check)  # the real one passes
    with pytest.raises(AssertionError, match="differ"):
        sweep.run_check(arch, check, wrap=breaker)


def test_a_model_that_never_calls_us_fails():
    """Our attention function must have run: a check whose model never calls it fails (not a vacuous pass)."""
    arch = next(a for a in ARCHITECTURES if a.id == "llama:LlamaForCausalLM")
    with registered() as counter:
        model = sweep.build(arch)
        model.set_attn_implementation("sdpa")
        model.set_attn_implementation = lambda implementation: None  # stays on sdpa
        for check in (check_logits, check_gradients):
            with pytest.raises(AssertionError, match="never ran"):
                check(arch, model, counter)
