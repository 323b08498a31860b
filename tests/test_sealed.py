"""Sealed bundles: round trips, and every kind of tampering caught with an error that says so."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tempo.errors import ConfigError, SealError
from tempo.sealed.bundle import OpenBundle, seal_bundle
from tempo.sealed.stream import MAGIC, new_data_key, read_key_file
from test_cli import invoke

CHUNK = 64  # small records, so a small bundle has many


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(os.urandom(300))  # 5 records
    (d / "sub" / "b.txt").write_text("labels\n" * 10)
    (d / "empty").write_bytes(b"")
    return d


def _seal(data_dir: Path, out: Path, key: bytes, **kwargs) -> Path:
    seal_bundle(data_dir, {"model": "small_cnn", "epochs": 1}, out, key, chunk_bytes=CHUNK, **kwargs)
    return out


def _unseal(path: Path, key: bytes, dest: Path) -> dict:
    with OpenBundle(path, key) as bundle:
        bundle.extract(dest)
        return bundle.config


def test_a_bundle_round_trips_every_file_and_the_config(data_dir, tmp_path):
    key = new_data_key()
    weights = tmp_path / "w.pt"
    weights.write_bytes(os.urandom(100))
    bundle = _seal(data_dir, tmp_path / "b.sealed", key, weights=weights)
    assert b"labels" not in bundle.read_bytes() and b"small_cnn" not in bundle.read_bytes()
    config = _unseal(bundle, key, tmp_path / "out")
    assert config == {"model": "small_cnn", "epochs": 1}
    for name in ("a.bin", "sub/b.txt", "empty"):
        assert (tmp_path / "out" / "data" / name).read_bytes() == (data_dir / name).read_bytes()
    assert (tmp_path / "out" / "initial_weights.pt").read_bytes() == weights.read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == config


def test_sealing_twice_gives_unrelated_ciphertexts(data_dir, tmp_path):
    key = new_data_key()
    one, two = _seal(data_dir, tmp_path / "1", key).read_bytes(), _seal(data_dir, tmp_path / "2", key).read_bytes()
    assert len(one) == len(two) and one != two  # fresh run id (key) and fresh nonces


def test_flipping_any_byte_is_detected(data_dir, tmp_path):
    key = new_data_key()
    original = _seal(data_dir, tmp_path / "b", key).read_bytes()
    tampered = tmp_path / "t"
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 0x01
        tampered.write_bytes(data)
        with pytest.raises(SealError):
            _unseal(tampered, key, tmp_path / f"out{i}")


def _records(raw: bytes) -> tuple[bytes, list[bytes]]:
    """Split a sealed file into its preamble (magic + header) and its records."""
    pos = len(MAGIC) + 4 + int.from_bytes(raw[len(MAGIC):len(MAGIC) + 4], "big")
    head, records = raw[:pos], []
    while pos < len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "big")
        records.append(raw[pos:pos + 4 + n])
        pos += 4 + n
    return head, records


def test_reordered_dropped_or_spliced_records_are_detected(data_dir, tmp_path):
    key = new_data_key()
    head, records = _records(_seal(data_dir, tmp_path / "b", key).read_bytes())
    _, other = _records(_seal(data_dir, tmp_path / "c", key).read_bytes())
    assert len(records) == 1 + 5 + 2 + 0  # manifest, a.bin, sub/b.txt (70 bytes), empty
    cases = {
        "swapped": [*records[:1], records[2], records[1], *records[3:]],
        "dropped": records[:3] + records[4:],
        "spliced from another bundle under the same key": [*records[:2], other[2], *records[3:]],
        "duplicated": [*records[:3], records[2], *records[3:]],
    }
    for name, parts in cases.items():
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(head + b"".join(parts))
        with pytest.raises(SealError, match=r"fails authentication|truncated|after its last record"):
            _unseal(path, key, tmp_path / f"out-{path.name}")


def test_truncation_anywhere_is_detected(data_dir, tmp_path):
    key = new_data_key()
    raw = _seal(data_dir, tmp_path / "b", key).read_bytes()
    head, records = _records(raw)
    for cut in [0, 5, len(head) - 1, len(head), len(head) + len(records[0]), len(raw) - len(records[-1]),
                len(raw) - 1]:
        (tmp_path / "t").write_bytes(raw[:cut])
        with pytest.raises(SealError, match=r"truncated|not a sealed|fails authentication"):
            _unseal(tmp_path / "t", key, tmp_path / f"out{cut}")


def test_the_wrong_key_is_refused_before_anything_is_written(data_dir, tmp_path):
    bundle = _seal(data_dir, tmp_path / "b", new_data_key())
    with pytest.raises(SealError, match="record 0 fails authentication: wrong key"):
        _unseal(bundle, new_data_key(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_to_seal_are_named(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        seal_bundle(tmp_path / "missing", {}, tmp_path / "b", new_data_key())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no files"):
        seal_bundle(tmp_path / "empty", {}, tmp_path / "b", new_data_key())
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob("*.partial"))


def test_seal_and_unseal_commands(data_dir, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": "small_cnn", "epochs": 1, "scheme": "mix"}))
    bundle = tmp_path / "fmnist.sealed"
    r = invoke("seal", "--data", str(data_dir), "--model", str(config), "--out", str(bundle))
    assert r.returncode == 0, r.stderr
    key_file = tmp_path / "fmnist.sealed.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(read_key_file(key_file)) == 32
    r = invoke("seal", "--data", str(data_dir), "--model", str(config), "--out", str(bundle))
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    r = invoke("unseal", str(bundle), "--key", str(key_file), "--out", str(tmp_path / "plain"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "plain" / "data" / "a.bin").read_bytes() == (data_dir / "a.bin").read_bytes()
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["scheme"] == "mix"

    raw = bytearray(bundle.read_bytes())
    raw[-1] ^= 1
    bundle.write_bytes(raw)
    r = invoke("unseal", str(bundle), "--key", str(key_file), "--out", str(tmp_path / "again"))
    assert r.returncode == 2 and "fails authentication" in r.stderr
    assert not (tmp_path / "again").exists() and not (tmp_path / "again.partial").exists()


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "is not valid JSON"),
    ('{"modle": "resnet18"}', "unknown setting(s) ['modle']"),
    ('{"epochs": 0}', "epochs must be >= 1"),
    ('{"data_dir": "/home/me/data"}', "names a path on the training host"),
])
def test_seal_checks_the_run_settings_on_the_owners_machine(data_dir, tmp_path, content, message):
    config = tmp_path / "run.json"
    config.write_text(content)
    r = invoke("seal", "--data", str(data_dir), "--model", str(config), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.key").exists()


@pytest.mark.parametrize("purpose", ["model", "checkpoint"])
def test_flipping_any_byte_of_a_sealed_model_or_checkpoint_is_detected(tmp_path, purpose):
    import torch

    from tempo.sealed.model import open_state, seal_state

    key = new_data_key()
    path = seal_state({"w": torch.arange(6.0)}, tmp_path / "s", key, run_id="ab" * 16, step=7, purpose=purpose)
    manifest, state = open_state(path, key, purpose)
    assert (manifest["run_id"], manifest["step"]) == ("ab" * 16, 7) and state["w"].tolist() == list(range(6))
    other = "checkpoint" if purpose == "model" else "model"
    with pytest.raises(SealError, match=f"is a sealed {purpose}, not a {other}"):
        open_state(path, key, other)  # one cannot pass for the other
    original = path.read_bytes()
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 0x80
        path.write_bytes(data)
        with pytest.raises(SealError):
            open_state(path, key, purpose)


def test_sealed_run_files_keep_settings_and_metrics_for_their_run_only(tmp_path):
    from tempo.sealed.metrics import SealedRunFiles, open_metrics, write_plain
    from tempo.sealed.model import open_state

    key, run_id = new_data_key(), "ab" * 16
    with SealedRunFiles(tmp_path, key, run_id) as files:
        files.write_config(json.dumps({"model": "secret_cnn", "lr": 0.0123}))
        files.table("steps", ("step", "loss"), [{"step": 1, "loss": 2.71828}]).add({"step": 2, "loss": 1.41421})
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.sealed"]  # saved on leaving, and nothing else
    sealed = (tmp_path / "metrics.sealed").read_bytes()
    assert not [s for s in (b"secret_cnn", b"0.0123", b"2.71828", b"1.41421", b"loss") if s in sealed]
    assert files.read_config() == {"model": "secret_cnn", "lr": 0.0123}
    with pytest.raises(SealError, match=f"belongs to run {run_id}, not this run"):
        SealedRunFiles(tmp_path, key, "cd" * 16).read_config()
    with pytest.raises(SealError, match="is a sealed metrics, not a model"):
        open_state(tmp_path / "metrics.sealed", key)
    (tmp_path / "owner").mkdir()
    write_plain(open_metrics(tmp_path / "metrics.sealed", key), tmp_path / "owner")
    assert (tmp_path / "owner" / "steps.csv").read_text() == "step,loss\n1,2.71828\n2,1.41421\n"
    assert json.loads((tmp_path / "owner" / "config.json").read_text())["model"] == "secret_cnn"
