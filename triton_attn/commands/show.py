"""``triton-attn show``: a library mask's block picture, printed or saved as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

from .common import CommandError, library_mask, mask_kwargs, positive_int


def parse_block_size(text: str) -> Tuple[int, int]:
    parts = str(text).lower().replace("x", ",").split(",")
    try:
        sizes = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise CommandError(f"--block-size must be an int or Q,KV (e.g. 128 or 128,64), got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise CommandError(f"--block-size must be one or two positive integers, got {text!r}")
    return sizes


# The largest mask `show` builds: 4096 x 4096 blocks (512k tokens at block size 128) take ~5 s and ~0.4 GB
# on a 2-core machine; beyond that the command would run for minutes or exhaust memory.
MAX_BLOCKS = 4096 * 4096
MAX_GRID = 256  # characters per side of the printed picture (each block is two characters wide)


def check_picture_size(seq_len: int, kv_len: int, block_size: Tuple[int, int], grid: int) -> None:
    """Refuse, before anything is allocated, a mask or a picture that would not fit."""
    if isinstance(grid, bool) or not isinstance(grid, int) or not 0 <= grid <= MAX_GRID:
        raise CommandError(f"--grid must be an integer from 0 (one character per block) to {MAX_GRID}, got {grid!r}")
    nq, nkv = -(-seq_len // block_size[0]), -(-kv_len // block_size[1])
    if nq * nkv > MAX_BLOCKS:
        raise CommandError(f"--seq-len {seq_len} / --kv-len {kv_len} at block size {block_size} make {nq}x{nkv} "
                           f"blocks; show builds at most {MAX_BLOCKS:,} blocks (4096x4096): use a larger "
                           "--block-size or shorter lengths")
    if grid == 0 and max(nq, nkv) > MAX_GRID:
        raise CommandError(f"--grid 0 prints one character per block, and this mask has {nq}x{nkv} blocks; "
                           f"it prints at most {MAX_GRID} per side: use --grid N (N <= {MAX_GRID})")


def show_command(args) -> int:
    from ..masks import create_block_mask
    from ..masks.standard import full_block_mask

    seq_len = positive_int(args.seq_len, "--seq-len")
    kv_len = positive_int(args.kv_len, "--kv-len") if args.kv_len is not None else seq_len
    block_size = parse_block_size(args.block_size)
    check_picture_size(seq_len, kv_len, block_size, args.grid)
    named = library_mask(args.mask, seq_len, **mask_kwargs(args))
    if named.mask_mod is None:
        block_mask = full_block_mask(1, 1, seq_len, kv_len, "cpu", block_size)
    else:
        block_mask = create_block_mask(named.mask_mod, None, None, seq_len, kv_len, BLOCK_SIZE=block_size)
    partial = int(block_mask.partial_blocks().sum())
    full = int(block_mask.full_blocks().sum())
    nq, nkv = block_mask.num_blocks
    print(f"{named.label}: Q_LEN={seq_len}, KV_LEN={kv_len}, BLOCK_SIZE={block_size}, {nq}x{nkv} blocks: "
          f"{full} full, {partial} partial, {nq * nkv - full - partial} empty ({block_mask.sparsity():.1f}% skipped)")
    if named.score_mod is not None:
        print(f"score_mod: {named.score_mod.__name__} (applied to every computed score)")
    grid = -1 if args.grid == 0 else args.grid
    picture = block_mask.to_string(grid_size=grid, limit=1).split("\n", 1)[1]
    print(picture)
    if grid != -1 and (nq > grid or nkv > grid):
        print(f"(each character pair stands for up to {-(-nq // grid)}x{-(-nkv // grid)} blocks: "
              "█ all full, ░ some computed, blank all empty; --grid 0 shows every block)")
    else:
        print("(█ full block, ░ partial block: mask_mod evaluated, blank: skipped)")
    if args.png:
        _save_png(block_mask, named.label, Path(args.png))
        print(f"saved {args.png}")
    return 0


def _save_png(block_mask, title: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        raise CommandError("--png needs matplotlib (pip install 'triton-attn[bench]')") from None
    image = (block_mask.partial_blocks()[0, 0].int() + 2 * block_mask.full_blocks()[0, 0].int()).numpy()
    nq, nkv = image.shape
    size = min(12.0, max(3.0, 0.12 * max(nq, nkv)))
    fig, ax = plt.subplots(figsize=(size * nkv / max(nq, nkv) + 1.5, size * nq / max(nq, nkv) + 0.8))
    ax.imshow(image, cmap=ListedColormap(["#ffffff", "#9ecae1", "#08519c"]), vmin=0, vmax=2,
              interpolation="nearest", aspect="equal")
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    ax.set_title(f"{title}\n{block_mask.sparsity():.1f}% of blocks skipped "
                 f"(dark: full, light: partial, white: empty)", fontsize=9)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"KV block ({kv_bs} tokens)")
    ax.set_ylabel(f"Q block ({q_bs} tokens)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as error:
        raise CommandError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        plt.close(fig)
