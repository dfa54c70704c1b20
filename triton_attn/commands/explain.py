"""``triton-attn explain``: the route a described ``attention()`` call would take, and why."""

from __future__ import annotations

from .common import CommandError, library_mask, mask_kwargs, parse_device, parse_dtype, positive_int


def explain_command(args) -> int:
    import torch

    import triton_attn as ta

    for flag, value in (("--seq-len", args.seq_len), ("--heads", args.heads), ("--head-dim", args.head_dim),
                        ("--batch", args.batch)):
        positive_int(value, flag)
    if args.q_len is not None:
        positive_int(args.q_len, "--q-len")
        if args.q_len > args.seq_len:
            raise CommandError(f"--q-len ({args.q_len}) must be at most --seq-len ({args.seq_len})")
    if args.kv_heads is not None:
        positive_int(args.kv_heads, "--kv-heads")
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise CommandError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({kv_heads})")
    q_len = args.q_len or args.seq_len
    named = library_mask(args.mask, args.seq_len, device=device, **mask_kwargs(args))
    block_mask = None
    if named.mask_mod is not None:
        mask_mod = named.mask_mod
        if q_len != args.seq_len:  # the query rows are the last q_len positions of the sequence
            offset = args.seq_len - q_len

            def mask_mod(b, h, q_idx, kv_idx, inner=named.mask_mod):
                return inner(b, h, q_idx + offset, kv_idx)
        block_mask = ta.create_block_mask(mask_mod, None, None, q_len, args.seq_len, device=device)
    query = torch.empty(args.batch, args.heads, q_len, args.head_dim, dtype=dtype, device=device)
    key = torch.empty(args.batch, kv_heads, args.seq_len, args.head_dim, dtype=dtype, device=device)
    value = torch.empty_like(key)
    query.requires_grad_(args.grad)
    try:
        route = ta.explain(query, key, value, score_mod=named.score_mod, block_mask=block_mask,
                           enable_gqa=kv_heads != args.heads, backend=args.backend)
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from error
    print(f"attention(query [{args.batch}, {args.heads}, {q_len}, {args.head_dim}] {dtype}, {args.seq_len} keys, "
          f"mask {named.label}{', gradients' if args.grad else ''}) on {device}:")
    print(f"  backend  {route.backend}\n  family   {route.family}" + (f" (mask: {route.sdpa_mask})" if route.sdpa_mask
                                                                         else ""))
    print(f"  call     {route.call}\n  backward {route.backward}")
    for reason in route.reasons:
        print(f"  why:     {reason}")
    return 0
