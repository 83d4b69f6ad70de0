#!/bin/sh
# curve-secret.sh — prints the twn-curve Secret (see secret-curve.yaml) with fresh CURVE keys:
#
#   deploy/k8s/curve-secret.sh | kubectl -n twn apply -f -
#   TWN=/path/to/twn deploy/k8s/curve-secret.sh > twn-curve.yaml   # keep it somewhere safe
#
# One server keypair (coordinator + indexers), one client keypair each for the gates and the
# workers, and the allow-list of the two client public keys.  The keys are made by `twn keygen`
# in a private temporary directory that is removed afterwards; nothing else is written.
set -eu
TWN=${TWN:-twn}
umask 077
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for k in server gate worker; do
  if ! msg=$("$TWN" keygen --out "$dir/$k" 2>&1 >/dev/null); then
    echo "curve-secret.sh: $TWN keygen failed: $msg" >&2
    exit 1
  fi
done
{
  echo "# gate"
  cat "$dir/gate.pub"
  echo "# worker"
  cat "$dir/worker.pub"
} >"$dir/allowed_clients"
b64() { base64 -w0 <"$1"; }
cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: twn-curve
  labels:
    app.kubernetes.io/name: twn
    app.kubernetes.io/part-of: twn
type: Opaque
data:
  server.key: $(b64 "$dir/server.key")
  server.pub: $(b64 "$dir/server.pub")
  gate.key: $(b64 "$dir/gate.key")
  gate.pub: $(b64 "$dir/gate.pub")
  worker.key: $(b64 "$dir/worker.key")
  worker.pub: $(b64 "$dir/worker.pub")
  allowed_clients: $(b64 "$dir/allowed_clients")
YAML
