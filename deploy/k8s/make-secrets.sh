#!/bin/sh
# Creates the Kubernetes Secrets of a jpki-mobile deployment in namespace jpki, each from
# fresh random values (never committed). Needs kubectl and the `jpki` command (the
# project installed: pip install .). Usage: deploy/k8s/make-secrets.sh [PHONES]
# Running it again replaces every secret: do that only on a fresh deployment (the CA key
# files and the databases were made with the old ones).
set -eu
PHONES=${1:-50}
NS=jpki
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077
fresh() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > "$work/$1"; }

for name in amqp.password postgres.password mqtt-gateway.password mqtt-phone.secret \
            ca.passphrase; do
  fresh "$name"
done
# the TSM master key file (and the passphrase it is encrypted with), as the TSM makes it
python3 -c 'import sys; from pathlib import Path; from jpki.run import tsm_key_ring
tsm_key_ring(Path(sys.argv[1]))' "$work/tsm"

jpki ops broker-users --user "jpki=$work/amqp.password" --administrator --out "$work/users.json"
jpki ops mqtt-passwords --phones "$PHONES" --phone-secret-file "$work/mqtt-phone.secret" \
  --gateway-password-file "$work/mqtt-gateway.password" --out "$work/passwd.plain"
printf 'amqp://jpki:%s@rabbitmq:5672/' "$(cat "$work/amqp.password")" > "$work/amqp-url"
printf 'postgresql+asyncpg://jpki:%s@postgres:5432/jpki' "$(cat "$work/postgres.password")" \
  > "$work/db-url"
printf 'mqtt://jpki-gateway:%s@mosquitto:1883' "$(cat "$work/mqtt-gateway.password")" \
  > "$work/mqtt-gateway-url"

secret() {  # secret NAME --from-file=KEY=PATH...
  name=$1; shift
  kubectl -n "$NS" create secret generic "$name" "$@" --dry-run=client -o yaml \
    | kubectl apply -f -
}
kubectl get namespace "$NS" >/dev/null 2>&1 || kubectl create namespace "$NS"
secret jpki-urls --from-file=amqp-url="$work/amqp-url" --from-file=db-url="$work/db-url" \
  --from-file=mqtt-gateway-url="$work/mqtt-gateway-url"
secret jpki-postgres --from-file=password="$work/postgres.password"
secret jpki-rabbitmq-users --from-file=users.json="$work/users.json"
secret jpki-mosquitto-passwd --from-file=passwd.plain="$work/passwd.plain"
secret jpki-mqtt-phones --from-file=phone.secret="$work/mqtt-phone.secret"
secret jpki-ca --from-file=passphrase="$work/ca.passphrase"
secret jpki-tsm --from-file=tsm-master-keys.json="$work/tsm/tsm-master-keys.json" \
  --from-file=passphrase="$work/tsm/secrets/tsm.passphrase"
echo "secrets made for $PHONES phones in namespace $NS"
