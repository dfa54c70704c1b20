"""Architecture sweep: every transformers LM class with the attention interface, ours against its reference.

The list is computed from the installed transformers (``architectures()``): the classes named by the auto
mappings ``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES``, ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and
``MODEL_FOR_MASKED_LM_MAPPING_NAMES``, one entry per (model_type, model class), plus ``VARIANTS``. A model
type that transformers adds is swept without any change here. Each is built from a tiny random config
(``tiny_configs.tiny_config``: the config class's defaults shrunk by field name, plus ``OVERRIDES`` where
that fails) with ``attn_implementation="triton_attn"``, and compared with ``sdpa`` (``eager`` where it has
none) on the same weights by the checks of ``sweep_checks``: ``logits`` (padded batch), ``gradients``
(every parameter), ``generate`` (greedy tokens; generative models only).

Not tested, in one place: ``EXCLUDED`` (reasons outside our code, e.g. transformers cannot build or run
the model this way) and ``NO_INTERFACE`` (computed: no module of the model dispatches through transformers'
``ALL_ATTENTION_FUNCTIONS``, so ``triton_attn`` is never called). Failures of ours are no exclusions: they
are ``KNOWN_FAILURES``, which the tests mark ``xfail`` (strict: a fix must remove the entry).

``python -m tests.registry.architecture_sweep --markdown [--output docs/architectures.md]`` runs every check
of every architecture and writes the table of results (``docs/architectures.md`` is generated so).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import inspect
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from .sweep_checks import CHECK_FUNCTIONS, OURS, registered

CHECKS = ("logits", "gradients", "generate")
TASK_MAPPINGS = (("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
                 ("causal", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                 ("masked", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"))
SAMPLE_FRACTION = 4  # default mode: gradients and generate for about 1 architecture in 4 (``sampled``)
SWEEP_ENV = "TRITON_ATTN_SWEEP"  # "all": every check of every architecture (``sweep_everything``)


@dataclass(frozen=True)
class Architecture:
    """One model class of the auto mappings: ``task`` is the first mapping (seq2seq, causal, masked) naming it;
    ``variant`` names extra config overrides (``VARIANTS``) tested as an architecture of its own."""

    model_type: str
    class_name: str
    task: str
    variant: str = ""

    @property
    def id(self) -> str:
        return f"{self.model_type}:{self.class_name}" + (f"+{self.variant}" if self.variant else "")

    @property
    def generative(self) -> bool:
        return self.task != "masked"


# Extra architectures: model_type -> {variant name: config overrides}, for features a default config leaves off.
VARIANTS: Dict[str, Dict[str, Dict[str, object]]] = {
    "falcon": {"alibi": {"alibi": True}},  # Falcon-RW: ALiBi folded into the mask by the model
}


def architectures() -> List[Architecture]:
    """Every (model_type, model class) of the three LM auto mappings, plus ``VARIANTS``, sorted by id.
    Reads the mappings' names only: imports no model code."""
    from transformers.models.auto import modeling_auto

    found: Dict[Tuple[str, str], Architecture] = {}
    for task, mapping_name in TASK_MAPPINGS:
        for model_type, class_names in getattr(modeling_auto, mapping_name).items():
            names = class_names if isinstance(class_names, (list, tuple)) else (class_names,)
            for class_name in names:
                found.setdefault((model_type, class_name), Architecture(model_type, class_name, task))
    variants = [dataclasses.replace(arch, variant=variant) for arch in found.values()
                for variant in VARIANTS.get(arch.model_type, {})]
    return sorted(list(found.values()) + variants, key=lambda a: (a.model_type, a.class_name, a.variant))


def sampled(arch: Architecture, fraction: int = SAMPLE_FRACTION) -> bool:
    """Whether ``arch`` is in the deterministic default-mode sample (about 1 in ``fraction``): a hash of its id."""
    return int(hashlib.sha256(arch.id.encode()).hexdigest(), 16) % fraction == 0


def checks_of(arch: Architecture) -> Tuple[str, ...]:
    """The checks that apply to ``arch`` (``generate`` only for generative models)."""
    return CHECKS if arch.generative else tuple(c for c in CHECKS if c != "generate")


def selected(arch: Architecture, check: str, everything: bool) -> bool:
    """Whether the sweep runs ``check`` of ``arch``: every check in ``everything`` mode; by default ``logits``
    of every architecture and the other checks of the ``sampled`` ones."""
    return check in checks_of(arch) and (everything or check == "logits" or sampled(arch))


def sweep_everything(config=None) -> bool:
    """Whether the sweep runs every check of every architecture: ``TRITON_ATTN_SWEEP=all``, or pytest's
    ``--sweep-all`` (``config``: pytest's config; the option is registered in tests/registry/conftest.py)."""
    value = os.environ.get(SWEEP_ENV, "").strip().lower()
    if value not in ("", "all", "default"):
        raise ValueError(f"{SWEEP_ENV} must be 'all' (every check of every architecture) or 'default', "
                         f"got {os.environ[SWEEP_ENV]!r}")
    return value == "all" or bool(config is not None and config.getoption("--sweep-all", default=False))


class Excluded(Exception):
    """An architecture (or one of its checks) the sweep cannot test, with the reason."""


NO_INTERFACE = "no sdpa and no attention interface (its attention never calls ALL_ATTENTION_FUNCTIONS)"

# Static exclusions, model_type or Architecture.id (with "/check": that check only) -> reason. Only reasons
# outside our code belong here; our failures are KNOWN_FAILURES.
EXCLUDED: Dict[str, str] = {
    "blt/generate": "transformers' generate() fails for BLT: its cache asks BltConfig for num_hidden_layers",
    "bigbird_pegasus:BigBirdPegasusForConditionalGeneration": "its encoder's BigBird attention computes attention "
    "itself from the mask (never calls ALL_ATTENTION_FUNCTIONS); triton_attn refuses that mask use by name",
    "git": "transformers picks GIT's attention class from a fixed eager/sdpa table (KeyError for any other name)",
    "voxtral_realtime": "needs an audio input (input_features): its decoder reads the audio encoder's output",
    "gemma3n": "its vision tower is a timm model (the timm package is not a test dependency)",
    "gemma4_assistant": "a draft head: every layer reads the target model's shared KV states",
    "gemma4_unified_assistant": "a draft head: every layer reads the target model's shared KV states",
}

# Per-architecture config overrides, model_type -> {field or "sub_config.field": value}, where the generic
# shrinking of tiny_configs fails (mostly: defaults that transformers' own tests always override).
OVERRIDES: Dict[str, Dict[str, object]] = {
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    # the default DbrxAttentionConfig lacks the rope_theta the model reads, and clamps by clip_qkv=None
    "dbrx": {"attn_config.rope_theta": 1e4, "attn_config.clip_qkv": 8.0},
    "bamba": {"attn_layer_indices": [1]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "deepseek_v2": {"n_routed_experts": 4, "num_experts_per_tok": 2},
    "esm": {"vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32},
    "gemma4": {"text_config.global_head_dim": 32},  # the full-attention layers' head_dim (a kwarg, 512 by default)
    "gemma4_text": {"global_head_dim": 32},
    "gemma4_unified": {"text_config.global_head_dim": 32},
    "gemma4_unified_text": {"global_head_dim": 32},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},  # the default has no attention
    "dory": {"num_hidden_layers": 3, "n_input_layers": 1, "n_output_layers": 1,
             "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "kolibri1_1": {"index_num_heads": 2},  # at most the query heads of one key head
    **{model_type: {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4,
                    "indexer_compress_ratio": 2} for model_type in ("qwen4_exp", "qwen4_exp_text")},  # text-only
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "vibevoice_asr": {f"{tokenizer}_tokenizer_encoder_config.{field}": value
                      for tokenizer in ("acoustic", "semantic")
                      for field, value in (("downsampling_ratios", [2]), ("depths", [1, 1]), ("num_filters", 8))},
    "xmod": {"default_language": "en_XX"},
    # two hybrid layers: the second shares (ties) the first one's transformer block
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid", "linear_attention",
                                                            "hybrid"]},
    "musicgen": {"num_codebooks": 1},  # input_ids are [batch * codebooks, length]
    "musicgen_melody": {"num_codebooks": 1},
}


class KnownFailure(NamedTuple):
    """A failure of ours, tested as ``xfail``: ``strict`` (an unexpected pass fails the run, so the entry is
    removed when fixed) unless the fix is in flight elsewhere. ``checks``: the checks it fails (None: all)."""

    reason: str
    strict: bool = True
    checks: Optional[Tuple[str, ...]] = None


# Failures caused by our code, model_type or Architecture.id -> KnownFailure. Empty: every swept architecture
# passes (models that compute with their mask as a tensor get one: triton_attn/registry/tensor_mask_models.py).
KNOWN_FAILURES: Dict[str, KnownFailure] = {}


def known_failure(arch: Architecture, check: str) -> Optional[KnownFailure]:
    for key in (arch.id, arch.model_type):
        entry = KNOWN_FAILURES.get(key)
        if entry is not None and (entry.checks is None or check in entry.checks):
            return entry
    return None


def model_class(arch: Architecture):
    import transformers

    return getattr(transformers, arch.class_name)


def config_class(arch: Architecture):
    """The model_type's config class; the class's own when that is one of its sub-configs (a text-only
    ``Qwen3_5ForCausalLM`` of a ``qwen3_5`` multimodal config takes ``Qwen3_5TextConfig``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mapped, own = CONFIG_MAPPING[arch.model_type], model_class(arch).config_class
    if own is not mapped and own in (getattr(mapped, "sub_configs", None) or {}).values():
        return own
    return mapped


@functools.lru_cache(maxsize=None)
def _module_uses_interface(module_name: str) -> bool:
    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[module_name])


def uses_attention_interface(model_or_class) -> bool:
    """Whether a model class's module, or the module of any sub-module of a model, dispatches attention
    through transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    if isinstance(model_or_class, type):
        return _module_uses_interface(model_or_class.__module__)
    return any(_module_uses_interface(type(module).__module__) for module in model_or_class.modules())


def exclusion_reason(arch: Architecture) -> Optional[str]:
    """Why ``arch`` is not tested, or None: ``EXCLUDED``, or computed: its module never dispatches through
    the attention interface and it has no sub-configs (``build`` excludes a built model none of whose
    modules does)."""
    for key in (arch.id, arch.model_type):
        if key in EXCLUDED:
            return EXCLUDED[key]
    if not uses_attention_interface(model_class(arch)) and not getattr(config_class(arch), "sub_configs", None):
        return NO_INTERFACE
    return None


def build(arch: Architecture):
    """The tiny model of ``arch`` with our attention, float32, random weights from a fixed seed."""
    from .tiny_configs import tiny_config

    reason = exclusion_reason(arch)
    if reason is not None:
        raise Excluded(reason)
    overrides = {**OVERRIDES.get(arch.model_type, {}), **VARIANTS.get(arch.model_type, {}).get(arch.variant, {})}
    if arch.task == "causal":  # BERT-like classes are causal LMs only as decoders
        overrides.setdefault("is_decoder", True)
    config = tiny_config(config_class(arch), overrides)
    torch.manual_seed(0)
    model = model_class(arch)._from_config(config, attn_implementation=OURS, dtype=torch.float32)
    if not uses_attention_interface(model):
        raise Excluded(NO_INTERFACE)
    return model


def _excluded_check(arch: Architecture, check: str) -> Optional[str]:
    """The ``EXCLUDED`` reason of this one check of ``arch`` (a "/check" key), or None."""
    return EXCLUDED.get(f"{arch.id}/{check}", EXCLUDED.get(f"{arch.model_type}/{check}"))


def run_check(arch: Architecture, check: str, wrap: Optional[Callable[[Callable], Callable]] = None) -> str:
    """Build ``arch`` and run one check; returns the reference implementation compared with. Raises
    ``Excluded``, ``AssertionError`` (a mismatch) or whatever the model raised."""
    if check not in checks_of(arch):
        raise ValueError(f"{arch.id} has no {check!r} check (its checks: {', '.join(checks_of(arch))})")
    reason = _excluded_check(arch, check)
    if reason is not None:
        raise Excluded(reason)
    with registered(wrap) as counter:
        model = build(arch)
        CHECK_FUNCTIONS[check](arch, model, counter)
    return counter.reference


class Outcome(NamedTuple):
    """One check of one architecture: ``status`` is pass, fail, xfail (a ``KNOWN_FAILURES`` entry failed),
    xpass (one passed) or excluded; ``detail`` the reason or the error; ``reference`` sdpa / eager."""

    arch: Architecture
    check: str
    status: str
    detail: str
    reference: Optional[str]
    seconds: float


def run(arch: Architecture, check: str) -> Outcome:
    """``run_check`` as an ``Outcome`` (never raises for the model's failures)."""
    start, known, reference = time.perf_counter(), known_failure(arch, check), None
    try:
        reference = run_check(arch, check)
        status, detail = ("xpass", known.reason) if known else ("pass", "")
    except Excluded as reason:
        status, detail = "excluded", str(reason)
    except Exception as error:  # noqa: BLE001 -- any failure of the model is a result here
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        status, detail = ("xfail", known.reason) if known else ("fail", message[:300])
    return Outcome(arch, check, status, detail, reference, time.perf_counter() - start)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(outcomes: List[Outcome]) -> str:
    """The results as markdown: architectures whose every check passed, then known failures, untriaged
    failures and exclusions, each with its reason."""
    import transformers

    by_arch: Dict[Architecture, List[Outcome]] = {}
    for outcome in outcomes:
        by_arch.setdefault(outcome.arch, []).append(outcome)
    working, failing, excluded = [], [], []
    for arch, results in by_arch.items():  # in the order of architectures()
        statuses = {r.status for r in results}
        if statuses == {"excluded"}:
            excluded.append(f"| `{arch.model_type}` | `{arch.class_name}` | {_escape(results[0].detail)} |")
        elif statuses <= {"pass", "xpass", "excluded"}:
            passed = ", ".join(r.check for r in results if r.status in ("pass", "xpass"))
            notes = "; ".join(f"{r.check} not run: {r.detail}" for r in results if r.status == "excluded")
            reference = next(r.reference for r in results if r.reference)
            variant = f" ({arch.variant})" if arch.variant else ""
            working.append(f"| `{arch.model_type}` | `{arch.class_name}`{variant} | {arch.task} | {reference} | "
                           f"{passed}{' (' + _escape(notes) + ')' if notes else ''} |")
        else:
            for r in results:
                if r.status in ("fail", "xfail"):
                    kind = "known, ours" if r.status == "xfail" else "**untriaged**"
                    failing.append(f"| `{arch.model_type}` | `{arch.class_name}` | {r.check} | {kind} | "
                                   f"{_escape(r.detail)} |")
    today = datetime.date.today().isoformat()
    lines = [
        "# Transformers architectures on triton_attn",
        "",
        f"Generated on {today} with transformers {transformers.__version__} and torch {torch.__version__} by",
        "`python -m tests.registry.architecture_sweep --markdown --output docs/architectures.md` (the architecture",
        "sweep of `tests/registry/test_architecture_sweep.py`, every check of every architecture); do not edit.",
        "Each model is built from a tiny random float32 config and compared with transformers' `sdpa` (`eager`",
        "where it has none) on the same weights: logits of a padded batch, every parameter's gradient, and",
        "greedy `generate()` tokens (generative models).",
        "",
        f"## Known to work ({len(working)})",
        "",
        "| model type | class | task | compared with | checks passed |",
        "|---|---|---|---|---|",
        *working,
        "",
        f"## Failing ({len(failing)} checks)",
        "",
        "| model type | class | check | status | reason |",
        "|---|---|---|---|---|",
        *failing,
        "",
        f"## Not tested ({len(excluded)})",
        "",
        "| model type | class | reason |",
        "|---|---|---|",
        *excluded,
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.registry.architecture_sweep",
                                     description="Run the architecture sweep (every check of every architecture).")
    parser.add_argument("--markdown", action="store_true", help="print the results as a markdown table")
    parser.add_argument("--output", help="write the markdown to this file instead of printing it")
    parser.add_argument("--only", nargs="*", default=None, help="model types or architecture ids to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: more threads only add overhead
    outcomes = []
    for arch in architectures():
        if args.only and arch.model_type not in args.only and arch.id not in args.only:
            continue
        checks = list(checks_of(arch))
        for index, check in enumerate(checks):
            outcome = run(arch, check)
            print(f"{outcome.status:8} {arch.id} {check} {outcome.seconds:.2f}s {outcome.detail}"[:200],
                  file=sys.stderr, flush=True)
            if outcome.status == "excluded" and not _excluded_check(arch, check):  # the whole architecture
                outcomes += [outcome._replace(check=c) for c in checks[index:]]
                break
            outcomes.append(outcome)
    if args.markdown or args.output:
        text = markdown(outcomes)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(text)
        else:
            print(text)
    strict_passes = [o for o in outcomes if o.status == "xpass" and known_failure(o.arch, o.check).strict]
    return 1 if strict_passes or any(o.status == "fail" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
