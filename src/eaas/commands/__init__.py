"""The `eaas` CLI, one typer sub-app per module (mounted in :mod:`eaas.cli`).

Command modules import heavy dependencies (torch, transformers) inside the
command functions, so ``eaas --help`` stays fast.
"""
