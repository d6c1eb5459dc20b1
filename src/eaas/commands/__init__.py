"""The `eaas` CLI, one typer sub-app per module (mounted in :mod:`eaas.cli`).

Command modules import heavy dependencies (torch, transformers, redis-py, the
deployment) inside the command functions, on purpose: every module here is loaded
for ``eaas --help`` and the admin commands, which must answer in well under a
second without torch or transformers (issue 13; ``tests/test_install.py`` checks it).
"""
