"""``tempo seal`` / ``tempo unseal``: the owner's side of data at rest (run on a trusted machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from ..errors import ConfigError
from .errors import reported_errors


def _run_config(path: Path) -> dict:
    """A run's settings from a JSON file of ``tempo train`` options (TrainConfig fields), validated now
    so that a typo fails on the owner's machine, not in the cloud."""
    from ..training.config import TrainConfig

    try:
        fields = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read --model {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model {path} is not valid JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"--model {path} must hold a JSON object of training settings")
    unknown = sorted(set(fields) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"--model {path}: unknown setting(s) {unknown}")
    for local in ("data_dir", "out", "record"):
        if fields.get(local) is not None:
            raise ConfigError(f"--model {path}: '{local}' names a path on the training host; leave it out")
    try:
        TrainConfig(**fields)
    except TypeError as e:
        raise ConfigError(f"--model {path}: {e}") from None
    return fields


def _bytes_bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def seal(
    data: Annotated[Path, typer.Option(help="Dataset folder to seal (every file under it).")],
    model: Annotated[Path, typer.Option(help="JSON file of the run's settings (`tempo train` options, e.g. "
                                             '{"model": "resnet18", "epochs": 2}).')],
    out: Annotated[Path, typer.Option(help="The bundle file to write.")],
    weights: Annotated[Path | None, typer.Option(help="Initial weights (a state_dict saved with torch.save).")
                       ] = None,
    key: Annotated[Path | None, typer.Option(
        help="Seal under this existing key file; default: a fresh key, written to --key-out.")] = None,
    key_out: Annotated[Path | None, typer.Option(
        help="Where the fresh data key goes (default: OUT.key); never overwritten. Keep it: it is the "
             "only way to open the bundle.")] = None,
) -> None:
    """Encrypt a dataset and a run's settings into one bundle (AES-256-GCM) under the owner's data key."""
    with reported_errors():
        from ..sealed.bundle import seal_bundle
        from ..sealed.stream import new_data_key, read_key_file, write_key_file

        config = _run_config(model)
        if key is not None and key_out is not None:
            raise ConfigError("give --key (an existing key) or --key-out (a fresh one), not both")
        if out.exists():
            raise ConfigError(f"{out} exists: refusing to overwrite a bundle")
        data_key = read_key_file(key) if key is not None else new_data_key()
        fresh_key_path = None if key is not None else key_out or out.with_name(out.name + ".key")
        if fresh_key_path is not None:
            write_key_file(fresh_key_path, data_key)  # first: a bundle without its key would be lost
        total = sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) if data.is_dir() else 0
        with _bytes_bar(total, "sealing") as bar:
            run_id = seal_bundle(data, config, out, data_key, weights=weights, progress=bar.update)
        typer.echo(f"sealed {out} (run {run_id})" + (f"; data key in {fresh_key_path}" if fresh_key_path else ""))


def unseal(
    sealed: Annotated[Path, typer.Argument(help="A bundle (`tempo seal`), or a sealed model or metrics file "
                                                "(`tempo train --bundle`).")],
    key: Annotated[Path, typer.Option(help="The data key file it was sealed under.")],
    out: Annotated[Path, typer.Option(help="Folder to write the plaintext into (must not exist yet).")],
) -> None:
    """Decrypt and verify a sealed file into a new folder: all of it, or nothing if any byte fails.

    A bundle gives data/..., config.json (and initial_weights.pt); a sealed model gives model.pt
    (a plain state_dict) and manifest.json (the run id and training step it was sealed at); a bundle
    run's metrics.sealed gives config.json and steps, epochs and faults as .jsonl and .csv."""
    with reported_errors():
        from ..sealed.stream import purpose_of, read_key_file

        if out.exists():
            raise ConfigError(f"{out} exists: unseal into a new folder")
        data_key, purpose = read_key_file(key), purpose_of(sealed)
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
            what = _unseal_into(sealed, data_key, purpose, partial)
            partial.rename(out)  # all or nothing: a file that fails anywhere leaves no folder behind
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        typer.echo(f"unsealed {sealed} ({what}) into {out}")


def _unseal_into(sealed: Path, data_key: bytes, purpose: str, dest: Path) -> str:
    from ..sealed import bundle, metrics, model

    if purpose == bundle.PURPOSE:
        with bundle.OpenBundle(sealed, data_key) as opened:
            with _bytes_bar(sum(e.size for e in opened.entries), "unsealing") as bar:
                opened.extract(dest, progress=bar.update)
            return f"bundle of run {opened.run_id}"
    if purpose == model.PURPOSE:
        import torch

        manifest, state = model.open_state(sealed, data_key)
        torch.save(state, dest / "model.pt")
        (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return f"model of run {manifest.get('run_id')} at step {manifest.get('step')}"
    if purpose == metrics.PURPOSE:
        opened = metrics.open_metrics(sealed, data_key)
        metrics.write_plain(opened, dest)
        return f"settings and metrics of run {opened['run_id']}"
    raise ConfigError(f"{sealed} is a sealed {purpose!r}, which this command does not open")
