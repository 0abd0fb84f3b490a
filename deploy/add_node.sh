#!/usr/bin/env bash
# Add a SuperNode to the Docker deployment; the CA key never reaches a container or the secrets folder.
#
#   deploy/add_node.sh supernode-3 operator
#
# 1. make_certs.py signs the node's TLS certificate and makes its authentication key pair in certs/
#    (as you: certs/ and ca.key stay yours, so this works again for the next node);
# 2. prepare_host.py copies the node's files (ca.crt, <node>.crt/.key, auth/<node>; never ca.key)
#    into secrets/, owned by the images' user (uid 49999; this step runs with sudo unless you are root);
# 3. `flwr supernode register` registers its public key through the operator's connection.
# Then add its services to compose.yaml (copy supernode-2, clientapp-2 and network node-2, with 2
# replaced by the new number) and `docker compose up -d`.
#
# Environment: CERTS (default certs), SECRETS_DIR (default secrets), OWNER (default 49999:49999),
# PYTHON (an interpreter with the cryptography package: the project's virtual environment),
# SUDO (default sudo, empty when run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: deploy/add_node.sh NODE-NAME CONNECTION}
CONNECTION=${2:?usage: deploy/add_node.sh NODE-NAME CONNECTION}
CERTS=${CERTS:-certs}
SECRETS_DIR=${SECRETS_DIR:-secrets}
OWNER=${OWNER:-49999:49999}
PYTHON=${PYTHON:-python}
if [ "$(id -u)" = 0 ]; then SUDO=${SUDO-}; else SUDO=${SUDO-sudo}; fi

"$PYTHON" deploy/make_certs.py --out "$CERTS" --node "$NAME"
$SUDO python3 deploy/prepare_host.py --certs "$CERTS" --secrets "$SECRETS_DIR" --owner "$OWNER" --node "$NAME"
flwr supernode register "$CERTS/auth/$NAME.pub" "$CONNECTION" --name "$NAME"
echo "$NAME: registered; its SuperNode mounts $SECRETS_DIR/$NAME.crt, $NAME.key and auth/$NAME"
