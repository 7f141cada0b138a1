#!/bin/sh
# One-shot set-up (compose service `init`, in the jpki image): makes the deployment's
# secrets once, then derives what the brokers need from them. Re-running keeps them.
#   /run/jpki-secrets   passwords, the URLs that carry them, the MQTT phone secret
#   /data/secrets       CA key passphrase and TSM key-file passphrase (read by the services)
#   /init/rabbitmq      users.json: the broker user `jpki` (salted hash), imported at boot
#   /init/mosquitto     passwd.plain: gateway + phones, hashed by mosquitto_passwd -U
set -eu
umask 077
S=/run/jpki-secrets
PHONES=${JPKI_PHONES:-50}

fresh() {  # fresh FILE: a random secret, unless FILE already holds one
  if [ ! -s "$1" ]; then
    python -c 'import secrets; print(secrets.token_urlsafe(32))' > "$1"
  fi
}

mkdir -p /data/secrets
for name in amqp.password postgres.password mqtt-gateway.password mqtt-phone.secret; do
  fresh "$S/$name"
done
fresh /data/secrets/ca.passphrase
fresh /data/secrets/tsm.passphrase

printf 'amqp://jpki:%s@rabbitmq:5672/\n' "$(cat "$S/amqp.password")" > "$S/amqp.url"
printf 'postgresql+asyncpg://jpki:%s@postgres:5432/jpki\n' "$(cat "$S/postgres.password")" \
  > "$S/db.url"
printf 'mqtt://jpki-gateway:%s@mosquitto:1883\n' "$(cat "$S/mqtt-gateway.password")" \
  > "$S/mqtt-gateway.url"

jpki ops broker-users --user "jpki=$S/amqp.password" --administrator \
  --out /init/rabbitmq/users.json
jpki ops mqtt-passwords --phones "$PHONES" --phone-secret-file "$S/mqtt-phone.secret" \
  --gateway-password-file "$S/mqtt-gateway.password" --out /init/mosquitto/passwd.plain
echo "init: secrets ready for $PHONES phones"
