"""The subcommands of ``triton-attn`` (``triton_attn/cli.py`` builds the parser and dispatches)."""
