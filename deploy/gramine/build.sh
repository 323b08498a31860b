#!/usr/bin/env bash
# Build and sign Tempo's SGX enclave with Gramine, and print the MRENCLAVE the owner's key server
# must expect. NOT YET RUN ON SGX HARDWARE (see docs/deploy.md).
#
# Usage: deploy/gramine/build.sh --keyserver HOST:PORT --bundle-name NAME --untrusted-dir DIR
#            [--checkpoint-every N] [--resume] [--enclave-size 16G] [--threads 8] [--key enclave-key.pem]
# Needs: gramine (>= 1.5: gramine-manifest, gramine-sgx-sign), and this repository's .venv set up
# (bash scripts/setup). The key defaults to Gramine's (gramine-sgx-gen-private-key makes one).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
keyserver= bundle_name= untrusted_dir= checkpoint_every=100 resume=0 enclave_size=16G threads=8
key="${XDG_CONFIG_HOME:-$HOME/.config}/gramine/enclave-key.pem"
while [ $# -gt 0 ]; do
  case $1 in
    --keyserver) keyserver=$2; shift 2 ;;
    --bundle-name) bundle_name=$2; shift 2 ;;
    --untrusted-dir) untrusted_dir=$(cd "$2" && pwd); shift 2 ;;
    --checkpoint-every) checkpoint_every=$2; shift 2 ;;
    --resume) resume=1; shift ;;
    --enclave-size) enclave_size=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --key) key=$2; shift 2 ;;
    *) echo "error: unknown option $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
for name in keyserver bundle_name untrusted_dir; do
  if [ -z "${!name}" ]; then echo "error: --${name//_/-} is required" >&2; exit 2; fi
done
for tool in gramine-manifest gramine-sgx-sign; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found: install Gramine >= 1.5" >&2; exit 2; }
done
[ -f "$key" ] || { echo "error: no signing key $key (make one with gramine-sgx-gen-private-key)" >&2; exit 2; }
python="$repo/.venv/bin/python3"
[ -x "$python" ] || { echo "error: $python missing: run bash scripts/setup first" >&2; exit 2; }
python=$(readlink -f "$python")
stdlib=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
site_packages=$("$repo/.venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
arch_libdir=/lib/$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)

out="$here/build"
mkdir -p "$out"
gramine-manifest -Darch_libdir="$arch_libdir" -Dpython="$python" -Dstdlib="$stdlib" \
  -Dsite_packages="$site_packages" -Dkeyserver="$keyserver" -Dbundle_name="$bundle_name" \
  -Duntrusted_dir="$untrusted_dir" -Dcheckpoint_every="$checkpoint_every" -Dresume="$resume" \
  -Denclave_size="$enclave_size" -Dthreads="$threads" -Dmax_threads=$((threads * 4 + 16)) -Dedmm=0 \
  -Dlog_level=error "$here/tempo.manifest.template" "$out/tempo.manifest"
gramine-sgx-sign --key "$key" --manifest "$out/tempo.manifest" --output "$out/tempo.manifest.sgx"
mrenclave=$(gramine-sgx-sigstruct-view --output-format json "$out/tempo.sig" | "$python" -c \
  'import json, sys; print(json.load(sys.stdin)["mr_enclave"])')
echo "built $out/tempo.manifest.sgx"
echo "MRENCLAVE $mrenclave   (the owner runs: tempo keyserver --expect sgx:$mrenclave --trust-root INTEL_ROOT.pem ...)"
echo "run it:  cd $out && gramine-sgx tempo"
