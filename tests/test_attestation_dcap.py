"""The sgx and tdx backends on DCAP quotes built here, field by field, to Intel's documented layouts.

There is no SGX or TDX hardware here: the "Intel root", PCK chain, attestation key and QE report are made up, so
these tests show that the parser follows the layouts as written and that every link of the chain is checked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tempo.attestation import dcap
from tempo.attestation.evidence import Evidence
from tempo.errors import AttestationError, ConfigError

INTEL_VENDOR = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
REPORT_DATA = bytes(range(64))
MR_ENCLAVE = bytes.fromhex("aa" * 32)
MR_TD = b"\x01" * 48
RTMRS = [bytes([0x10 + i]) * 48 for i in range(4)]
SGX_MEASUREMENT = MR_ENCLAVE.hex()
TDX_MEASUREMENT = (MR_TD + b"".join(RTMRS)).hex()
MEASUREMENT = {"sgx": SGX_MEASUREMENT, "tdx": TDX_MEASUREMENT}


# ---- a made-up Intel PKI -------------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey, *,
          ca: bool, expired: bool = False) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    start, end = (now - timedelta(days=60), now - timedelta(days=30)) if expired else (now - timedelta(days=1),
                                                                                       now + timedelta(days=30))
    return (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Pki:
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    pck: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey

    def pem(self, leaf: x509.Certificate | None = None, intermediate: x509.Certificate | None = None) -> bytes:
        certs = (leaf or self.pck, intermediate or self.intermediate, self.root)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs) + b"\0"


def make_pki(root_name: str = "Intel SGX Root CA") -> Pki:
    root_key, ca_key, pck_key = _key(), _key(), _key()
    root = _cert(root_name, root_key, root_name, root_key, ca=True)
    intermediate = _cert("Intel SGX PCK Platform CA", ca_key, root_name, root_key, ca=True)
    pck = _cert("Intel SGX PCK Certificate", pck_key, "Intel SGX PCK Platform CA", ca_key, ca=False)
    return Pki(root, root_key, intermediate, ca_key, pck, pck_key)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


# ---- quotes, laid out by hand --------------------------------------------------------------------------

def u16(n: int) -> bytes:
    return n.to_bytes(2, "little")


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)[1:]


def sgx_body(mr_enclave: bytes, report_data: bytes, *, debug: bool = False) -> bytes:
    """sgx_report_body_t: 384 bytes."""
    flags = 0x1 | (0x2 if debug else 0)  # INITTED, DEBUG
    fields = [(16, bytes(16)), (4, bytes(4)), (12, bytes(12)), (16, bytes(16)),  # cpu_svn .. isv_ext_prod_id
              (16, flags.to_bytes(8, "little") + (0x3).to_bytes(8, "little")),  # attributes: flags, xfrm
              (32, mr_enclave), (32, bytes(32)), (32, b"\x5e" * 32), (32, bytes(32)),  # mr_enclave .. reserved3
              (64, bytes(64)), (2, u16(1)), (2, u16(2)), (2, u16(0)), (42, bytes(42)), (16, bytes(16)),
              (64, report_data)]
    assert all(len(value) == size for size, value in fields)
    body = b"".join(value for _, value in fields)
    assert len(body) == 384 and body[64:96] == mr_enclave and body[320:] == report_data
    return body


def td_body(report_data: bytes, *, debug: bool = False) -> bytes:
    """TD report body (TDX 1.0): 584 bytes."""
    fields = [(16, b"\x03" * 16), (48, b"\xee" * 48), (48, bytes(48)), (8, bytes(8)),  # tee_tcb_svn .. seam_attrs
              (8, (0x1 if debug else 0).to_bytes(8, "little")), (8, (0xE7).to_bytes(8, "little")),  # td_attrs, xfam
              (48, MR_TD), (48, b"\xc1" * 48), (48, b"\xc2" * 48), (48, b"\xc3" * 48),  # mr_td .. mr_owner_config
              *[(48, rtmr) for rtmr in RTMRS], (64, report_data)]
    assert all(len(value) == size for size, value in fields)
    body = b"".join(value for _, value in fields)
    assert len(body) == 584 and body[136:184] == MR_TD and body[328:520] == b"".join(RTMRS)
    assert body[520:] == report_data
    return body


def header(version: int, tee_type: int, key_type: int = 2) -> bytes:
    data = u16(version) + u16(key_type) + u32(tee_type) + u16(7) + u16(13) + INTEL_VENDOR + b"\x42" * 20
    assert len(data) == 48
    return data


@dataclass
class Build:
    """Knobs for one quote; each test turns one to break one link."""

    report_data: bytes = REPORT_DATA
    debug: bool = False
    auth_data: bytes = b"qe auth data"
    qe_binding: bytes | None = None  # the QE report's report data; None: the correct binding
    qe_signer: ec.EllipticCurvePrivateKey | None = None  # None: the PCK key
    cert_type: int = 5
    pem: bytes | None = None


def make_quote(pki: Pki, backend: str, build: Build | None = None) -> bytes:
    b = build or Build()
    attestation_key = _key()
    ak = raw_public(attestation_key)
    binding = b.qe_binding if b.qe_binding is not None else hashlib.sha256(ak + b.auth_data).digest() + bytes(32)
    qe_report = sgx_body(b"\x9e" * 32, binding)
    pem = b.pem if b.pem is not None else pki.pem()
    qe_part = (qe_report + raw_sign(b.qe_signer or pki.pck_key, qe_report) + u16(len(b.auth_data)) + b.auth_data
               + u16(b.cert_type) + u32(len(pem)) + pem)
    if backend == "sgx":
        signed = header(3, 0) + sgx_body(MR_ENCLAVE, b.report_data, debug=b.debug)
        certification = qe_part
    else:
        signed = header(4, 0x81) + td_body(b.report_data, debug=b.debug)
        certification = u16(6) + u32(len(qe_part)) + qe_part
    signature_data = raw_sign(attestation_key, signed) + ak + certification
    return signed + u32(len(signature_data)) + signature_data


def evidence(backend: str, quote: bytes, *, report_data: bytes = REPORT_DATA, measurement: str | None = None,
             ) -> Evidence:
    return Evidence(backend, measurement or MEASUREMENT[backend], report_data.hex(), {"quote": quote.hex()})


def refused(ev: Evidence, roots: list[x509.Certificate], match: str) -> None:
    with pytest.raises(AttestationError, match=match):
        dcap.verify(ev, roots)


BACKENDS = pytest.mark.parametrize("backend", ["sgx", "tdx"])


# ---- what verifies -----------------------------------------------------------------------------------

@BACKENDS
def test_a_genuine_quote_verifies(pki, backend):
    ev = evidence(backend, make_quote(pki, backend))
    dcap.verify(Evidence.from_json(ev.to_json()), [make_pki("another root").root, pki.root])


def test_tdx_measurement_is_mrtd_then_the_four_rtmrs(pki):
    quote = dcap.parse_quote(make_quote(pki, "tdx"), "tdx")
    assert quote.measurement == MR_TD + RTMRS[0] + RTMRS[1] + RTMRS[2] + RTMRS[3]
    assert quote.report_data == REPORT_DATA


def test_sgx_measurement_is_mrenclave(pki):
    quote = dcap.parse_quote(make_quote(pki, "sgx"), "sgx")
    assert quote.measurement == MR_ENCLAVE and quote.report_data == REPORT_DATA


# ---- each link, broken ---------------------------------------------------------------------------------

@BACKENDS
@pytest.mark.parametrize("offset", [30, 48 + 5, 48 + 70, 48 + 200])  # header user data; body, MR* and elsewhere
def test_a_flipped_byte_breaks_the_quote_signature(pki, backend, offset):
    quote = bytearray(make_quote(pki, backend))
    quote[offset] ^= 0x01
    refused(evidence(backend, bytes(quote)), [pki.root], r"quote signature \(by the attestation key\) does not verify")


@BACKENDS
def test_wrong_report_data_is_refused(pki, backend):
    ev = evidence(backend, make_quote(pki, backend), report_data=bytes(64))
    refused(ev, [pki.root], "made for another session")


@BACKENDS
def test_wrong_measurement_is_refused(pki, backend):
    ev = evidence(backend, make_quote(pki, backend), measurement="00" * (len(MEASUREMENT[backend]) // 2))
    refused(ev, [pki.root], "but the evidence claims")


@BACKENDS
def test_a_chain_to_another_root_is_refused(pki, backend):
    refused(evidence(backend, make_quote(make_pki(), backend)), [pki.root], "not one of the 1 Intel root")


def test_no_roots_refuses_everything(pki):
    refused(evidence("sgx", make_quote(pki, "sgx")), [], "not one of the 0 Intel root")


def test_a_forged_intermediate_under_the_trusted_roots_name_is_refused(pki):
    forger = _key()
    forged_ca = _cert("Intel SGX PCK Platform CA", forger, "Intel SGX Root CA", forger, ca=True)
    leaf = _cert("Intel SGX PCK Certificate", pki.pck_key, "Intel SGX PCK Platform CA", forger, ca=False)
    quote = make_quote(pki, "sgx", Build(pem=pki.pem(leaf, forged_ca)))
    refused(evidence("sgx", quote), [pki.root], "intermediate CA certificate is not signed by")


def test_a_leaf_not_signed_by_the_intermediate_is_refused(pki):
    leaf = _cert("Intel SGX PCK Certificate", pki.pck_key, "Intel SGX PCK Platform CA", _key(), ca=False)
    refused(evidence("tdx", make_quote(pki, "tdx", Build(pem=pki.pem(leaf)))), [pki.root],
            "PCK leaf certificate is not signed by")


def test_a_non_ca_intermediate_is_refused(pki):
    ca_key = _key()
    not_ca = _cert("Intel SGX PCK Platform CA", ca_key, "Intel SGX Root CA", pki.root_key, ca=False)
    leaf = _cert("Intel SGX PCK Certificate", pki.pck_key, "Intel SGX PCK Platform CA", ca_key, ca=False)
    refused(evidence("sgx", make_quote(pki, "sgx", Build(pem=pki.pem(leaf, not_ca)))), [pki.root],
            "not a CA certificate")


def test_an_expired_pck_certificate_is_refused(pki):
    leaf = _cert("Intel SGX PCK Certificate", pki.pck_key, "Intel SGX PCK Platform CA", pki.ca_key, ca=False,
                 expired=True)
    refused(evidence("sgx", make_quote(pki, "sgx", Build(pem=pki.pem(leaf)))), [pki.root], "is not valid now")


@BACKENDS
def test_a_qe_report_not_signed_by_the_pck_key_is_refused(pki, backend):
    refused(evidence(backend, make_quote(pki, backend, Build(qe_signer=_key()))), [pki.root],
            r"QE report signature \(by the PCK key\) does not verify")


@BACKENDS
@pytest.mark.parametrize("binding", [bytes(64), hashlib.sha256(b"other").digest() + b"\x01" * 32])
def test_a_qe_report_that_does_not_bind_the_attestation_key_is_refused(pki, backend, binding):
    refused(evidence(backend, make_quote(pki, backend, Build(qe_binding=binding))), [pki.root],
            "does not bind the quote's attestation key")


@BACKENDS
def test_debug_is_refused(pki, backend):
    refused(evidence(backend, make_quote(pki, backend, Build(debug=True))), [pki.root],
            "debug enclave" if backend == "sgx" else "TD runs under debug")


# ---- malformed quotes -------------------------------------------------------------------------------------

@BACKENDS
@pytest.mark.parametrize("length", [0, 40, 48 + 100, 48 + 384 + 2, 48 + 584 + 4 + 100])
def test_a_short_quote_is_refused_naming_the_field(pki, backend, length):
    refused(evidence(backend, make_quote(pki, backend)[:length]), [pki.root], "is truncated: the .* needs")


@BACKENDS
def test_a_signature_data_length_that_cuts_the_structures_short_is_refused(pki, backend):
    quote = make_quote(pki, backend)
    start = 48 + (384 if backend == "sgx" else 584)
    cut = quote[start + 4:-100]
    refused(evidence(backend, quote[:start] + u32(len(cut)) + cut), [pki.root],
            "the signature data of the .* quote is truncated: the .* needs")


@BACKENDS
def test_trailing_bytes_are_refused(pki, backend):
    refused(evidence(backend, make_quote(pki, backend) + b"\0"), [pki.root], "1 unexpected bytes")


@pytest.mark.parametrize(("backend", "other"), [("sgx", "tdx"), ("tdx", "sgx")])
def test_the_other_tees_quote_is_refused(pki, backend, other):
    refused(evidence(backend, make_quote(pki, other)), [pki.root], "needs a DCAP quote version")


def test_another_key_type_or_vendor_is_refused(pki):
    quote = make_quote(pki, "sgx")
    refused(evidence("sgx", quote[:2] + u16(3) + quote[4:]), [pki.root], "attestation key type is 3")
    refused(evidence("sgx", quote[:12] + bytes(16) + quote[28:]), [pki.root], "not Intel's")


@BACKENDS
def test_other_certification_data_is_refused(pki, backend):
    refused(evidence(backend, make_quote(pki, backend, Build(cert_type=4))), [pki.root], "has type 4, expected 5")


def test_a_v4_quote_without_qe_report_certification_data_is_refused(pki):
    quote = bytearray(make_quote(pki, "tdx"))
    quote[48 + 584 + 4 + 128:48 + 584 + 4 + 130] = u16(5)
    refused(evidence("tdx", bytes(quote)), [pki.root], "has type 5, expected 6")


def test_a_chain_that_is_not_pem_or_not_three_certificates_is_refused(pki):
    refused(evidence("sgx", make_quote(pki, "sgx", Build(pem=b"not pem"))), [pki.root], "not PEM")
    two = pki.root.public_bytes(serialization.Encoding.PEM) * 2
    refused(evidence("sgx", make_quote(pki, "sgx", Build(pem=two))), [pki.root], "has 2 certificates, expected 3")


def test_evidence_without_a_hex_quote_is_refused(pki):
    refused(Evidence("sgx", SGX_MEASUREMENT, REPORT_DATA.hex(), {}), [pki.root], "needs a hex 'quote'")
    refused(Evidence("tdx", TDX_MEASUREMENT, REPORT_DATA.hex(), {"quote": "zz"}), [pki.root], "needs a hex 'quote'")
    refused(Evidence("dev", SGX_MEASUREMENT, REPORT_DATA.hex(), {}), [pki.root], "not a DCAP backend")


# ---- the enclave side ---------------------------------------------------------------------------------------

def fake_gramine(folder: Path, quote: bytes, kind: str = "dcap\n") -> Path:
    folder.mkdir()
    (folder / "attestation_type").write_text(kind)
    (folder / "user_report_data").write_bytes(bytes(64))
    (folder / "quote").write_bytes(quote)
    return folder


def test_gramine_attester_writes_report_data_and_returns_verifiable_evidence(pki, tmp_path):
    root = fake_gramine(tmp_path / "attestation", make_quote(pki, "sgx"))
    ev = dcap.GramineSgxAttester(root).evidence(REPORT_DATA)
    assert (root / "user_report_data").read_bytes() == REPORT_DATA
    assert (ev.backend, ev.measurement, ev.report_data) == ("sgx", SGX_MEASUREMENT, REPORT_DATA.hex())
    dcap.verify(ev, [pki.root])


def test_gramine_attester_refuses_a_quote_for_other_report_data(pki, tmp_path):
    root = fake_gramine(tmp_path / "attestation", make_quote(pki, "sgx", Build(report_data=bytes(64))))
    with pytest.raises(AttestationError, match="other report data"):
        dcap.GramineSgxAttester(root).evidence(REPORT_DATA)


def test_gramine_attester_outside_gramine_says_how_to_run(tmp_path):
    with pytest.raises(ConfigError, match=r'gramine-sgx with sgx.remote_attestation = "dcap"'):
        dcap.GramineSgxAttester(tmp_path / "missing")


def test_gramine_attester_without_dcap_says_so(pki, tmp_path):
    root = fake_gramine(tmp_path / "attestation", b"", kind="none")
    with pytest.raises(ConfigError, match="attestation type is 'none'"):
        dcap.GramineSgxAttester(root)


def test_gramine_attester_reports_a_failed_quote_as_setup(pki, tmp_path):
    root = fake_gramine(tmp_path / "attestation", b"")
    (root / "quote").unlink()
    with pytest.raises(ConfigError, match="could not produce a DCAP quote"):
        dcap.GramineSgxAttester(root).evidence(REPORT_DATA)


def test_tdx_attester_asks_its_quote_source_for_the_report_data(pki):
    asked: list[bytes] = []

    def source(report_data: bytes) -> bytes:
        asked.append(report_data)
        return make_quote(pki, "tdx", Build(report_data=report_data))

    ev = dcap.TdxAttester(source).evidence(REPORT_DATA)
    assert asked == [REPORT_DATA] and ev.measurement == TDX_MEASUREMENT
    dcap.verify(ev, [pki.root])


def test_attesters_refuse_report_data_of_the_wrong_size(pki):
    with pytest.raises(ValueError, match="64 bytes"):
        dcap.TdxAttester(lambda rd: b"").evidence(b"short")
