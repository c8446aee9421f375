#!/usr/bin/env bash
# Makes a throwaway certificate authority and a server certificate signed by it, for trying
# --tls-cert/--tls-key on this machine and for the TLS rows of perf.sh: ca.pem (what clients
# trust: the load tester's --ca-file, NODE_EXTRA_CA_CERTS, curl --cacert), cert.pem and key.pem
# (the server's, for localhost and 127.0.0.1, ECDSA P-256), valid 30 days. Never for production.
#
# Usage: loadtest/scripts/tls-cert.sh DIR
set -euo pipefail
dir=${1:?usage: tls-cert.sh DIR}
mkdir -p "$dir"
cd "$dir"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 30 \
  -subj "/CN=causeloop-stream throwaway CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
openssl req "${ec[@]}" -keyout key.pem -out server.csr -subj /CN=localhost 2>/dev/null
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 30 \
  -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n') 2>/dev/null
rm -f server.csr ca.srl
echo "$dir: ca.pem cert.pem key.pem"
