#!/bin/sh
# Runs `jpki "$@"`. A URL that carries a password comes from a mounted secret file:
# JPKI_AMQP_URL_FILE, JPKI_MQTT_URL_FILE and JPKI_DB_URL_FILE name the files whose
# content becomes JPKI_AMQP_URL, JPKI_MQTT_URL and JPKI_DB_URL (which the commands read).
set -eu
for name in JPKI_AMQP_URL JPKI_MQTT_URL JPKI_DB_URL; do
  eval "file=\${${name}_FILE:-}"
  if [ -n "$file" ]; then
    value=$(cat "$file")
    export "$name=$value"
  fi
done
exec jpki "$@"
