"""Generation benchmark: a small Llama from a config, ``triton_attn`` vs ``sdpa`` vs ``eager`` in one run.

The setup of issue 10: a randomly initialised LlamaForCausalLM (no download; ``--layers`` layers), a
batch of ``--batch`` prompts of ``--prompt`` tokens with left padding (sequence i is padded by
``i * prompt / 8`` tokens), ``--new-tokens`` greedy tokens with a static cache. Every implementation
runs the same model weights on the same inputs in this process, the implementations interleaved run by
run, ``--repeats`` runs after a warm-up (the median counts).

Measured per implementation: prefill ms (the first forward over the prompt) and decode ms per step
(the median of the following forwards, one token each), from the model's forward pre/post hooks, so
``generate``'s own bookkeeping is outside both. The greedy tokens of all implementations must be equal
(asserted). Results: ``bench/results/generate_<date>_<device>_torch<v>_transformers<v>.{csv,md}``,
every row stamped with date, device and versions; the ``.md`` checks the targets (decode and prefill
<= 1.1x sdpa) and adds the host cost of one decode step's mask at a 4k cache (``decode_mask_timings``).

Usage::

    python bench/bench_generate.py            # 4 layers, B=2, 512-token prompt, 32 new tokens
    python bench/bench_generate.py --quick    # a small smoke run (2 layers, 64-token prompt, 4 tokens)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout, installed or not
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

IMPLEMENTATIONS = ("triton_attn", "sdpa", "eager")
RESULTS = ROOT / "bench" / "results"
TARGET = 1.1  # triton_attn / sdpa, prefill and decode


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (heads of 64)")
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.prompt, args.new_tokens, args.repeats = 2, 256, 64, 4, 1
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    return args


def build_model(args, implementation: str):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt + args.new_tokens + 8)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=implementation).eval()


def prompts(args):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 32000, (args.batch, args.prompt), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(args.batch):
        padded = row * args.prompt // 8
        attention_mask[row, :padded] = 0
        input_ids[row, :padded] = 0
    return input_ids, attention_mask


class ForwardTimer:
    """Wall time of every forward of ``model`` (pre/post hooks)."""

    def __init__(self, model):
        self.times: List[float] = []
        self._start = 0.0
        model.register_forward_pre_hook(lambda *_: self._begin())
        model.register_forward_hook(lambda *_: self._end())

    def _begin(self):
        self._start = time.perf_counter()

    def _end(self):
        self.times.append(time.perf_counter() - self._start)


def generate_once(model, timer: ForwardTimer, args, input_ids, attention_mask):
    """One greedy generation: (prefill ms, mean decode ms per step, new tokens)."""
    timer.times.clear()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static",
                             pad_token_id=0)
    # The median step: a shared machine's stalls hit single steps (a descheduled thread costs a whole
    # time slice), and the median keeps them from deciding the comparison.
    decode = statistics.median(timer.times[1:]) * 1e3 if len(timer.times) > 1 else float("nan")
    return timer.times[0] * 1e3, decode, out[:, input_ids.shape[1]:]


def run_all(args, input_ids, attention_mask) -> Dict[str, Dict[str, object]]:
    """Every implementation, interleaved run by run (a shared machine's load then hits all alike);
    the first run of each warms caches (kernels, masks, allocator) and is not counted."""
    models = {name: build_model(args, name) for name in IMPLEMENTATIONS}
    timers = {name: ForwardTimer(model) for name, model in models.items()}
    samples = {name: {"prefill": [], "decode": [], "tokens": None} for name in IMPLEMENTATIONS}
    for repeat in range(args.repeats + 1):
        for name, model in models.items():
            prefill, decode, tokens = generate_once(model, timers[name], args, input_ids, attention_mask)
            if repeat:
                samples[name]["prefill"].append(prefill)
                samples[name]["decode"].append(decode)
            samples[name]["tokens"] = tokens
    return {name: {"prefill_ms": statistics.median(s["prefill"]), "decode_ms": statistics.median(s["decode"]),
                   "tokens": s["tokens"]} for name, s in samples.items()}


def median_ms(fn, repeats: int = 200) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def decode_mask_timings(batch: int = 2, cache: int = 4096, kv_heads_group: int = 4) -> Dict[str, float]:
    """Host cost of one decode step's mask at a ``cache``-token static cache (1 query row at the end,
    left padding), median ms: what ``sdpa``'s mask function costs, what ``triton_attn``'s costs on CPU
    (the mask function, whose block lists wait, plus the dense bias its CPU attention derives once per
    step), and the mask with its block lists built (what a Triton launch reads)."""
    import transformers.masking_utils as masking_utils

    from triton_attn.backends.torch import cpu_flash
    from triton_attn.registry.masking import make_mask_function

    attention_mask = torch.ones(batch, cache, dtype=torch.long)
    attention_mask[0, :cache // 8] = 0
    arguments = dict(batch_size=batch, q_length=1, kv_length=cache, q_offset=cache - 1, kv_offset=0,
                     mask_function=masking_utils.causal_mask_function, attention_mask=attention_mask)
    triton_mask = make_mask_function()
    sdpa_mask = masking_utils.AttentionMaskInterface._global_mapping["sdpa"]
    return {
        "sdpa mask function": median_ms(lambda: sdpa_mask(**arguments, allow_is_causal_skip=False)),
        "triton_attn mask function + CPU bias": median_ms(
            lambda: cpu_flash.dense_bias(triton_mask(**arguments), kv_heads_group)),
        "triton_attn mask with block lists": median_ms(lambda: triton_mask(**arguments).kv_indices),
    }


def device_name() -> str:
    return f"cpu-{platform.machine()}-x{torch.get_num_threads()}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    import triton_attn.registry as registry

    registry.register_transformers()
    input_ids, attention_mask = prompts(args)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results = run_all(args, input_ids, attention_mask)
    mask_costs = decode_mask_timings(args.batch)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    reference = results["sdpa"]["tokens"]
    same = {name: bool(torch.equal(result["tokens"], reference)) for name, result in results.items()}
    assert all(same.values()), f"greedy tokens differ from sdpa's: {same}"

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")  # seconds: runs in one minute keep their files
    versions = dict(torch=torch.__version__.split("+")[0], transformers=transformers.__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"generate_{stamp}_{device_name()}_torch{versions['torch']}_transformers"
                       f"{versions['transformers']}" + ("_quick" if args.quick else ""))
    rows = [dict(date=stamp, device=device_name(), python=platform.python_version(), **versions,
                 threads=torch.get_num_threads(), impl=name, layers=args.layers, hidden=args.hidden,
                 batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens, repeats=args.repeats,
                 prefill_ms=f"{result['prefill_ms']:.2f}", decode_ms=f"{result['decode_ms']:.3f}",
                 same_tokens=same[name], load_avg=f"{load_before:.1f}-{load_after:.1f}")
            for name, result in results.items()]
    with open(f"{stem}.csv", "w", newline="") as stream:  # not with_suffix: the versions have dots
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sdpa = results["sdpa"]
    lines = [f"# Generation benchmark {stamp} ({device_name()}, torch {versions['torch']}, "
             f"transformers {versions['transformers']})", "",
             f"Llama from a config: {args.layers} layers, hidden {args.hidden}, {args.hidden // 64} heads / "
             f"{args.kv_heads} KV heads; B={args.batch}, {args.prompt}-token prompt with left padding, "
             f"{args.new_tokens} greedy tokens, static cache; median of {args.repeats} interleaved runs "
             "after a warm-up (decode: each run's median step). "
             f"Load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs "
             "(a shared machine's load makes single numbers noisy; the runs are interleaved so it hits all alike).", "",
             "| implementation | prefill ms | decode ms/step | prefill / sdpa | decode / sdpa | same tokens |",
             "|---|---|---|---|---|---|"]
    for name, result in results.items():
        lines.append(f"| {name} | {result['prefill_ms']:.1f} | {result['decode_ms']:.2f} | "
                     f"{result['prefill_ms'] / sdpa['prefill_ms']:.2f}x | "
                     f"{result['decode_ms'] / sdpa['decode_ms']:.2f}x | {same[name]} |")
    ours = results["triton_attn"]
    for what in ("prefill", "decode"):
        ratio = ours[f"{what}_ms"] / sdpa[f"{what}_ms"]
        lines.append(f"\n- target {what} <= {TARGET}x sdpa: {ratio:.2f}x -> {'met' if ratio <= TARGET else 'NOT met'}")
    lines += ["", f"Decode-step mask at a 4096-token cache (B={args.batch}, 1 query row, left padding), "
              "median ms on the same machine:", "", "| mask | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in mask_costs.items()]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    print(f"results: {stem}.csv / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
