#!/bin/sh
# Starts the eclm edge agent of device {{DEVICE_ID}}; eclm-edge.service runs it with
# the variables of @PREFIX@/etc/edge.env and credentials.env in its environment.
# By hand (as the service's user): set -a; . @PREFIX@/etc/edge.env; . @PREFIX@/etc/credentials.env; set +a
set -eu
: "${ECLM_DEVICE_ID:?not set: start eclm-edge.service, or load @PREFIX@/etc/edge.env first}"
: "${ECLM_BROKER_PASSWORD:?not set: load @PREFIX@/etc/credentials.env first}"
set -- --profile "$ECLM_PROFILE" --broker "$ECLM_BROKER" --device-id "$ECLM_DEVICE_ID" \
    --cafile "$ECLM_CAFILE" --trust-key "$ECLM_TRUST_KEY" --store "$ECLM_STORE"
for label in ${ECLM_LABELS:-}; do
    set -- "$@" --label "$label"
done
# Optional, from edge.env: held-out data to report accuracy on, LiteRT's delegates, and a
# latency slack for the health check (an emulated board; see edge.env).
[ -z "${ECLM_EVAL_DATA:-}" ] || set -- "$@" --eval-data "$ECLM_EVAL_DATA"
[ -z "${ECLM_LITERT_DELEGATES:-}" ] || set -- "$@" --litert-delegates "$ECLM_LITERT_DELEGATES"
[ -z "${ECLM_LATENCY_SLACK:-}" ] || set -- "$@" --latency-slack "$ECLM_LATENCY_SLACK"
# exec: the agent keeps this process id, the one systemd watches and takes notices from.
exec "@PREFIX@/venv/bin/eclm" edge run "$@"
