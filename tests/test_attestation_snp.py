"""The sev-snp backend and the configfs-tsm client, on evidence built here: no SEV-SNP hardware is involved.

A made-up ARK -> ASK -> VCEK chain imitates AMD's (RSASSA-PSS with SHA-384 and a 48-byte salt for the
certificates, an ECDSA P-384 VCEK), and reports are written field by field at the offsets of the SEV-SNP
firmware ABI specification, independently of the parser's own layout.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tempo.attestation import snp, tsm
from tempo.attestation.evidence import Evidence
from tempo.errors import AttestationError, ConfigError

REPORT_DATA = bytes(range(64))
MEASUREMENT = bytes(range(100, 148))
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
NOW = datetime.now(timezone.utc)


# ---- a fake AMD chain ----------------------------------------------------------------------------------

def _cert(subject: str, key, issuer: str, issuer_key, *, days: int = 30) -> x509.Certificate:
    rsa_padding = PSS if isinstance(issuer_key, rsa.RSAPrivateKey) else None
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=days))
            .sign(issuer_key, hashes.SHA384(), rsa_padding=rsa_padding))


class Chain:
    def __init__(self, product: str):
        self.ark_key, self.ask_key = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
        self.vcek_key = ec.generate_private_key(ec.SECP384R1())
        self.ark = _cert(f"ARK-{product}", self.ark_key, f"ARK-{product}", self.ark_key)
        self.ask = _cert(f"SEV-{product}", self.ask_key, f"ARK-{product}", self.ark_key)
        self.vcek = _cert("SEV-VCEK", self.vcek_key, f"SEV-{product}", self.ask_key)


@pytest.fixture(scope="module")
def amd() -> Chain:
    return Chain("Milan")


@pytest.fixture(scope="module")
def other() -> Chain:
    return Chain("Impostor")


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def build_report(vcek_key, *, report_data: bytes = REPORT_DATA, measurement: bytes = MEASUREMENT,
                 policy: int = 0x30000, algo: int = 1) -> bytes:
    """A report written at the spec's offsets, signed over bytes 0x000..0x29F like the AMD Secure Processor."""
    raw = bytearray(0x4A0)
    struct.pack_into("<IIQ", raw, 0x00, 2, 7, policy)  # version, guest_svn, policy
    raw[0x10:0x20], raw[0x20:0x30] = b"F" * 16, b"I" * 16  # family_id, image_id
    struct.pack_into("<IIQQ", raw, 0x30, 0, algo, 0x1100000000000203, 0x3)  # vmpl, algo, current_tcb, platform
    raw[0x50:0x90], raw[0x90:0xC0] = report_data, measurement
    raw[0xC0:0xE0], raw[0xE0:0x110], raw[0x110:0x140] = b"H" * 32, b"D" * 48, b"A" * 48
    raw[0x140:0x160], raw[0x160:0x180] = b"R" * 32, b"M" * 32  # report_id, report_id_ma
    struct.pack_into("<Q", raw, 0x180, 0x1100000000000204)  # reported_tcb
    raw[0x1A0:0x1E0] = b"C" * 64  # chip_id
    return sign(raw, vcek_key)


def sign(raw: bytearray | bytes, vcek_key) -> bytes:
    raw = bytearray(raw)
    r, s = decode_dss_signature(vcek_key.sign(bytes(raw[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    raw[0x2A0:0x2E8], raw[0x2E8:0x330] = r.to_bytes(72, "little"), s.to_bytes(72, "little")
    return bytes(raw)


def evidence(report: bytes, chain: Chain | None, *, with_chain: bool = True, **fields) -> Evidence:
    body: dict = {"report": report.hex()}
    if chain is not None:
        body["vcek"] = _pem(chain.vcek)
        if with_chain:
            body["chain"] = [_pem(chain.ask), _pem(chain.ark)]
    return Evidence("sev-snp", fields.get("measurement", MEASUREMENT.hex()),
                    fields.get("report_data", REPORT_DATA.hex()), body)


def refused(ev: Evidence, roots: list[x509.Certificate], match: str) -> None:
    with pytest.raises(AttestationError, match=match):
        snp.verify(ev, roots)


# ---- the report ----------------------------------------------------------------------------------------

def test_parse_reads_every_field_at_the_spec_offset(amd):
    report = snp.parse_report(build_report(amd.vcek_key))
    assert (report.version, report.guest_svn, report.policy) == (2, 7, 0x30000)
    assert (report.vmpl, report.signature_algo) == (0, 1)
    assert (report.family_id, report.image_id) == (b"F" * 16, b"I" * 16)
    assert (report.current_tcb, report.platform_info, report.reported_tcb) == (0x1100000000000203, 3,
                                                                               0x1100000000000204)
    assert (report.report_data, report.measurement) == (REPORT_DATA, MEASUREMENT)
    assert (report.host_data, report.id_key_digest, report.author_key_digest) == (b"H" * 32, b"D" * 48, b"A" * 48)
    assert (report.report_id, report.report_id_ma, report.chip_id) == (b"R" * 32, b"M" * 32, b"C" * 64)
    assert len(report.signed) == 0x2A0 and not report.debug


@pytest.mark.parametrize("size", [0, 0x2A0, 0x49F, 0x4A1])
def test_a_report_of_the_wrong_size_is_refused(amd, size):
    refused(evidence(bytes(size), amd), [amd.ark], "attestation report is 1184 bytes, got")


def test_a_report_that_is_not_hex_is_refused(amd):
    refused(replace(evidence(b"", amd), body={"report": "zz"}), [amd.ark], r"body\['report'\]")


# ---- verification ----------------------------------------------------------------------------------------

def test_a_report_signed_by_a_vcek_chained_to_the_trusted_ark_verifies(amd):
    ev = evidence(build_report(amd.vcek_key), amd)
    snp.verify(Evidence.from_json(ev.to_json()), [amd.ark])


def test_without_a_chain_the_ask_can_be_a_trusted_root(amd):
    ev = evidence(build_report(amd.vcek_key), amd, with_chain=False)
    snp.verify(ev, [amd.ask, amd.ark])
    refused(ev, [amd.ark], "VCEK certificate .* neither is nor is signed by one of the AMD root")


def test_a_chain_to_the_trusted_ark_key_under_another_name_verifies(amd):
    """Roots are compared by key: a re-encoded copy of the ARK is still the ARK."""
    reissued = _cert("ARK-Milan", amd.ark_key, "ARK-Milan", amd.ark_key, days=60)
    snp.verify(evidence(build_report(amd.vcek_key), amd), [reissued])


@pytest.mark.parametrize("offset", [0x00, 0x08, 0x50, 0x90, 0x1A0, 0x29F])
def test_a_flipped_byte_in_the_signed_area_is_refused(amd, offset):
    raw = bytearray(build_report(amd.vcek_key))
    raw[offset] ^= 0x01
    ev = evidence(bytes(raw), amd, report_data=raw[0x50:0x90].hex(), measurement=raw[0x90:0xC0].hex())
    refused(ev, [amd.ark], "report's signature does not verify with the VCEK's key")


def test_a_flipped_signature_byte_is_refused(amd):
    raw = bytearray(build_report(amd.vcek_key))
    raw[0x2A0] ^= 0x01
    refused(evidence(bytes(raw), amd), [amd.ark], "signature does not verify")


def test_other_report_data_is_refused(amd):
    ev = evidence(build_report(amd.vcek_key), amd, report_data=bytes(64).hex())
    refused(ev, [amd.ark], "report_data is not the evidence's")


def test_another_measurement_is_refused(amd):
    ev = evidence(build_report(amd.vcek_key), amd, measurement=bytes(48).hex())
    refused(ev, [amd.ark], f"report measures {MEASUREMENT.hex()}, but the evidence claims 0000")


def test_a_debuggable_guest_is_refused(amd):
    ev = evidence(build_report(amd.vcek_key, policy=0x30000 | 1 << 19), amd)
    refused(ev, [amd.ark], r"allows debugging \(policy bit 19\)")


def test_another_signature_algorithm_is_refused(amd):
    refused(evidence(build_report(amd.vcek_key, algo=2), amd), [amd.ark], "signature algorithm is 2, expected 1")


def test_a_chain_to_another_ark_is_refused(amd, other):
    refused(evidence(build_report(other.vcek_key), other), [amd.ark], "ARK certificate .* neither is nor is signed")


def test_a_vcek_not_signed_by_the_ask_is_refused(amd, other):
    ev = evidence(build_report(other.vcek_key), other)
    ev.body["chain"] = [_pem(amd.ask), _pem(amd.ark)]
    refused(ev, [amd.ark], "VCEK certificate is not issued by the ASK certificate")


def test_a_vcek_under_the_asks_name_but_not_its_key_is_refused(amd, other):
    forged = _cert("SEV-VCEK", other.vcek_key, "SEV-Milan", other.ask_key)
    ev = evidence(build_report(other.vcek_key), amd)
    ev.body["vcek"] = _pem(forged)
    refused(ev, [amd.ark], "VCEK certificate's signature does not verify with the ASK's key")


def test_a_report_signed_by_another_key_than_the_vcek_is_refused(amd, other):
    refused(evidence(build_report(other.vcek_key), amd), [amd.ark], "another chip signed it")


def test_an_expired_vcek_is_refused(amd):
    expired = _cert("SEV-VCEK", amd.vcek_key, "SEV-Milan", amd.ask_key, days=-1)
    ev = evidence(build_report(amd.vcek_key), amd)
    ev.body["vcek"] = _pem(expired)
    refused(ev, [amd.ark], "VCEK certificate is valid from .* not now")


def test_a_vcek_without_a_p384_key_is_refused(amd):
    key = ec.generate_private_key(ec.SECP256R1())
    ev = evidence(build_report(amd.vcek_key), amd)
    ev.body["vcek"] = _pem(_cert("SEV-VCEK", key, "SEV-Milan", amd.ask_key))
    refused(ev, [amd.ark], "not an ECDSA P-384 key")


def test_missing_or_malformed_certificates_are_refused(amd):
    report = build_report(amd.vcek_key)
    refused(evidence(report, None), [amd.ark], r"no VCEK certificate \(PEM in body\['vcek'\]\)")
    ev = evidence(report, amd)
    ev.body["vcek"] = "not a certificate"
    refused(ev, [amd.ark], "VCEK certificate is not a PEM X.509 certificate")
    ev = evidence(report, amd)
    ev.body["chain"] = [_pem(amd.ask), _pem(amd.ark), _pem(amd.ark)]
    refused(ev, [amd.ark], "at most two PEM certificates")


# ---- the host's certificate table ----------------------------------------------------------------------

def cert_table(entries: dict) -> bytes:
    head = 24 * (len(entries) + 1)
    table, blobs = b"", b""
    for guid, der in entries.items():
        table += struct.pack("<16sII", guid.bytes, head + len(blobs), len(der))
        blobs += der
    return table + bytes(24) + blobs + bytes(100)  # padded, as the host hands over whole pages


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_the_certificate_table_is_parsed_by_guid(amd):
    entries = {snp.VCEK_GUID: _der(amd.vcek), snp.ASK_GUID: _der(amd.ask), snp.ARK_GUID: _der(amd.ark)}
    assert snp.parse_cert_table(cert_table(entries)) == entries
    assert snp.parse_cert_table(bytes(24)) == {}


def test_a_malformed_certificate_table_is_refused(amd):
    with pytest.raises(AttestationError, match="no terminating all-zero entry"):
        snp.parse_cert_table(struct.pack("<16sII", snp.VCEK_GUID.bytes, 0, 24))
    bad = struct.pack("<16sII", snp.VCEK_GUID.bytes, 48, 10_000) + bytes(24)
    with pytest.raises(AttestationError, match="points past its end"):
        snp.parse_cert_table(bad)


# ---- the enclave's side --------------------------------------------------------------------------------

def _fake_tsm(monkeypatch, outblob: bytes, auxblob: bytes | None, provider: str = "sev_guest") -> None:
    monkeypatch.setattr(tsm, "get_report", lambda data, *, root: tsm.TsmReport(provider, outblob, auxblob))


def test_the_attester_s_evidence_verifies_with_the_host_s_certificates(monkeypatch, amd):
    table = cert_table({snp.VCEK_GUID: _der(amd.vcek), snp.ASK_GUID: _der(amd.ask), snp.ARK_GUID: _der(amd.ark)})
    _fake_tsm(monkeypatch, build_report(amd.vcek_key), table)
    ev = snp.SnpAttester().evidence(REPORT_DATA)
    assert (ev.backend, ev.measurement, ev.report_data) == ("sev-snp", MEASUREMENT.hex(), REPORT_DATA.hex())
    assert ev.body["vcek"] == _pem(amd.vcek) and ev.body["chain"] == [_pem(amd.ask), _pem(amd.ark)]
    snp.verify(Evidence.from_json(ev.to_json()), [amd.ark])


def test_without_a_certificate_table_the_evidence_carries_no_vcek(monkeypatch, amd):
    _fake_tsm(monkeypatch, build_report(amd.vcek_key), None)
    assert set(snp.SnpAttester().evidence(REPORT_DATA).body) == {"report"}


def test_the_attester_refuses_another_tee_and_a_report_for_other_data(monkeypatch, amd):
    _fake_tsm(monkeypatch, build_report(amd.vcek_key), None, provider="tdx_guest")
    with pytest.raises(ConfigError, match="'tdx_guest', not 'sev_guest'"):
        snp.SnpAttester().evidence(REPORT_DATA)
    _fake_tsm(monkeypatch, build_report(amd.vcek_key, report_data=bytes(64)), None)
    with pytest.raises(AttestationError, match="other report data than this guest asked for"):
        snp.SnpAttester().evidence(REPORT_DATA)


# ---- configfs-tsm ----------------------------------------------------------------------------------------

@pytest.fixture
def kernel(monkeypatch):
    """Imitate the kernel's one behaviour plain files lack: each write bumps `generation` (by `step`)."""
    state = {"step": 1}
    write = tsm._write

    def writing(path: Path, data: bytes) -> None:
        write(path, data)
        generation = path.parent / "generation"
        generation.write_text(f"{int(generation.read_text()) + state['step']}\n")

    monkeypatch.setattr(tsm, "_write", writing)
    return state


def entry(root: Path, *, auxblob: bytes | None = b"certs") -> Path:
    """An entry as the kernel would show it after mkdir, with the report it would produce."""
    path = root / "tempo"
    path.mkdir()
    (path / "provider").write_text("sev_guest\n")
    (path / "generation").write_text("0\n")
    (path / "outblob").write_bytes(b"report")
    if auxblob is not None:
        (path / "auxblob").write_bytes(auxblob)
    return path


def test_get_report_writes_inblob_and_reads_the_blobs(tmp_path, kernel):
    path = entry(tmp_path)
    assert tsm.get_report(REPORT_DATA, root=tmp_path, name="tempo") == tsm.TsmReport("sev_guest", b"report", b"certs")
    assert (path / "inblob").read_bytes() == REPORT_DATA
    assert path.is_dir()  # it existed before: left in place


def test_get_report_without_auxblob(tmp_path, kernel):
    entry(tmp_path, auxblob=None)
    assert tsm.get_report(REPORT_DATA, root=tmp_path, name="tempo").auxblob is None


def test_get_report_detects_a_concurrent_writer(tmp_path, kernel):
    entry(tmp_path)
    kernel["step"] = 2  # someone else wrote too
    with pytest.raises(AttestationError, match=r"another process wrote .* \(generation went from 0 to 2, expected 1\)"):
        tsm.get_report(REPORT_DATA, root=tmp_path, name="tempo")


def test_get_report_removes_the_entry_it_made(tmp_path, kernel):
    with pytest.raises(AttestationError, match=r"cannot read .*generation"):  # plain mkdir makes no attributes
        tsm.get_report(REPORT_DATA, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_get_report_without_configfs_tsm_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"missing does not exist: .*CONFIG_TSM_REPORTS.*TDX or SEV-SNP guest"):
        tsm.get_report(REPORT_DATA, root=tmp_path / "missing")


def test_get_report_takes_64_bytes(tmp_path):
    with pytest.raises(ValueError, match="64 bytes"):
        tsm.get_report(b"short", root=tmp_path)
