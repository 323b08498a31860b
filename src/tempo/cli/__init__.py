"""The ``tempo`` command line. This module only registers the subcommands, one module each.

Subcommand modules import torch and the enclave lazily, inside the command, so ``tempo --help``
and bad options answer at once.
"""

from __future__ import annotations

import typer

from . import attack, attest, env, predict, seal, serve, train, worker

# Tracebacks never show local variables: in the enclave they hold plaintext weights and keys.
app = typer.Typer(name="tempo", help="Confidential training: the enclave offloads every product, blinded.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
app.command("train")(train.train)
app.command("env")(env.env)
app.command("attack")(attack.attack)
app.command("seal")(seal.seal)
app.command("unseal")(seal.unseal)
app.command("measure")(attest.measure)
app.command("keyserver")(attest.keyserver)
app.command("worker")(worker.worker)
app.command("predict")(predict.predict)
app.command("serve")(serve.serve)


def main() -> None:
    """Console-script entry point (``tempo``)."""
    app()
