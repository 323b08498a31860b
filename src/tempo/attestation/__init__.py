"""Attested key release: the owner's data key goes only to enclave code the owner expects.

The enclave makes an ephemeral X25519 key pair and asks its TEE for *evidence* (a quote or report)
whose 64-byte report data is bound to that public key and to the key server's one-time challenge
(:func:`evidence.report_data`). The owner's key server checks the evidence and the measurement,
then wraps the data key to the ephemeral key (:mod:`.release`). Backends:

- ``dev`` (:mod:`.dev`): a software measurement (SHA-256 of Tempo's code) signed with an Ed25519 key. It proves
  nothing about hardware and says so every time it is used.
- ``sgx`` and ``tdx`` (:mod:`.dcap`): Intel DCAP ECDSA quotes (v3 from Gramine's /dev/attestation, v4 through
  configfs-tsm, :mod:`.tsm`), checked up to an Intel root the key server is given.
- ``sev-snp`` (:mod:`.snp`): AMD SEV-SNP attestation reports through configfs-tsm, checked VCEK -> ASK -> ARK.

The hardware backends follow the vendors' documented formats and are tested on constructed evidence; they
have NOT been run on TEE hardware.
"""
