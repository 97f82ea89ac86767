#!/usr/bin/env bash
# Make development secrets for docker-compose.yml (or a Kubernetes Secret):
#
#   deploy/dev-secrets.sh [FOLDER]      # default: ./secrets
#
# FOLDER/ca.crt, ca.key     a private CA (keep ca.key off servers)
# FOLDER/tls.crt, tls.key   the server certificate for localhost, 127.0.0.1 and weightsmith,
#                           valid for server and client authentication (the health probe
#                           presents it when the server requires client certificates)
# FOLDER/principals.json    one principal `admin` with every scope on every model
# FOLDER/admin.token        that principal's bearer token (the file stores only its SHA-256)
#
# For development only: production certificates come from your CA or cert-manager.
# Needs openssl and sha256sum. Existing files are kept.
set -euo pipefail

folder="${1:-secrets}"
mkdir -p "$folder"
chmod 700 "$folder"
cd "$folder"

if [[ ! -f ca.crt ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj "/CN=weightsmith development CA" -keyout ca.key -out ca.crt 2>/dev/null
fi
if [[ ! -f tls.crt ]]; then
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=weightsmith" -keyout tls.key -out tls.csr 2>/dev/null
  openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 90 -out tls.crt \
    -extfile <(printf '%s\n' \
      "subjectAltName=DNS:localhost,DNS:weightsmith,IP:127.0.0.1" \
      "extendedKeyUsage=serverAuth,clientAuth" \
      "basicConstraints=critical,CA:FALSE") 2>/dev/null
  rm -f tls.csr ca.srl
fi
if [[ ! -f principals.json ]]; then
  token="$(openssl rand -hex 32)"
  printf '%s\n' "$token" > admin.token
  digest="$(printf '%s' "$token" | sha256sum | cut -d' ' -f1)"
  cat > principals.json <<EOF
{"principals": [{"name": "admin", "token_sha256": "$digest", "scopes": ["read", "edit", "train", "admin"], "models": ["*"]}]}
EOF
fi
# The container runs as UID 10001: it reads the mounted files, the folder itself stays private.
chmod 644 ca.crt tls.crt tls.key principals.json
chmod 600 ca.key admin.token
echo "secrets in $(pwd): connect with token \$(cat $folder/admin.token) and CA $folder/ca.crt"
