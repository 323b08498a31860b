"""``tempo measure`` and ``tempo keyserver``: the owner's side of attested key release."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import reported_errors


def measure(
    dev_key: Annotated[Path | None, typer.Option(
        help="Also create a dev-backend signing key here (Ed25519, mode 0600) and print its public key, "
             "for `tempo keyserver --dev-trust`.")] = None,
) -> None:
    """Print the dev-backend measurement of this Tempo installation (SHA-256 of its code)."""
    with reported_errors():
        from ..attestation import dev

        measurement = dev.measure()
        typer.echo(f"measurement {measurement} (the owner expects it with `tempo keyserver --expect "
                   f"{dev.BACKEND}:{measurement}`)")
        if dev_key is not None:
            typer.echo(f"dev signing key {dev_key}: public key {dev.create_signing_key(dev_key)}")
            typer.echo(f"warning: {dev.WARNING}", err=True)


def keyserver(
    key: Annotated[Path, typer.Option(help="The data key file (from `tempo seal`).")],
    expect: Annotated[list[str], typer.Option(
        help="BACKEND:MEASUREMENT to release the key to (repeatable), e.g. sgx:<MRENCLAVE>, tdx:<MRTD||RTMR0-3>, "
             "sev-snp:<MEASUREMENT>, dev:<the value of `tempo measure`>.")],
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:7070",
    dev_trust: Annotated[list[str] | None, typer.Option(
        help="Accept dev-backend evidence signed by this public key (hex; repeatable). Proves nothing "
             "about hardware: for development only.")] = None,
    ledger: Annotated[Path | None, typer.Option(
        help="File where the newest checkpoint of each run is kept, so that a resumed run cannot be rolled back "
             "by deleting checkpoints (default: KEY.ledger.json).")] = None,
    allow_rewind: Annotated[list[str] | None, typer.Option(
        help="RUN_ID:STEP: let that run's ledger go back to STEP once (`tempo train --resume-step`), which it "
             "otherwise refuses: rolling a run back is the owner's call, not the host's (repeatable).")] = None,
    trust_root: Annotated[list[Path] | None, typer.Option(
        help="PEM file of a vendor root for hardware evidence (repeatable): Intel's SGX Provisioning "
             "Certification root (sgx, tdx), AMD's ARK (sev-snp).")] = None,
) -> None:
    """Release the data key to enclaves whose attestation evidence shows an expected measurement."""
    with reported_errors():
        from ..attestation import dev
        from ..attestation.ledger import Ledger, parse_rewind
        from ..attestation.policy import Policy, load_roots, parse_expected
        from ..attestation.release import KeyServer, parse_address
        from ..errors import ConfigError
        from ..sealed.stream import read_key_file

        expected = frozenset(parse_expected(m) for m in expect)
        for k in dev_trust or []:
            try:
                if len(bytes.fromhex(k)) != 32:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"--dev-trust {k!r} is not a 32-byte hex Ed25519 public key") from None
        roots = tuple(c for path in trust_root or [] for c in load_roots(path))
        if not roots and not dev_trust:
            raise ConfigError("give --trust-root (vendor roots for sgx, tdx, sev-snp evidence) or --dev-trust")
        policy = Policy(expected, frozenset(k.lower() for k in dev_trust or []), roots)
        if dev_trust:
            typer.echo(f"warning: {dev.WARNING}", err=True)
        server = KeyServer(read_key_file(key), policy,
                           ledger=Ledger(ledger or key.with_name(key.name + ".ledger.json"),
                                         rewinds=[parse_rewind(r) for r in allow_rewind or []]),
                           log=lambda line: typer.echo(line, err=True))
        host, port = parse_address(listen)
        try:
            bound = server.bind(host, port)
        except OSError as e:
            raise ConfigError(f"cannot listen on {listen}: {e.strerror}") from None
        typer.echo(f"key server listening on {bound[0]}:{bound[1]}", err=True)
        try:
            server.serve_forever()
        finally:
            server.close()
