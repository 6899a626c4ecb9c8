#!/bin/sh
# fedrad-entrypoint: the ONE place where deployment settings (environment variables, or a mounted
# KEY=VALUE file) become `fedrad` command-line flags. The container images, the compose files, the
# Kubernetes manifests and the systemd units all start fedrad through this script, so every deployment
# runs the same, tested `fedrad` commands (deploy/README.md lists the variables).
#
#   fedrad-entrypoint coordinator    fedrad coordinator (Flower SuperLink), TLS + node authentication
#   fedrad-entrypoint node           fedrad node (Flower SuperNode next to the site's images)
#   fedrad-entrypoint init           one-shot: consortium CA, coordinator certificate, site keys, consortium
#                                    signing key and synthetic sites (the compose demo consortium)
#   fedrad-entrypoint register       one-shot: enrol site public keys with a running coordinator
#   fedrad-entrypoint healthcheck    exit 0 when the role's port accepts a TCP connection
#   fedrad-entrypoint ARGS...        anything else: `fedrad ARGS...` (e.g. `scan /data/dicom`)
#
# FEDRAD_DRY_RUN=1 prints the command (one argument per line) instead of running it.
set -eu

me=fedrad-entrypoint
die() { echo "$me: $*" >&2; exit 2; }

# -- settings from the mounted config file; a variable already in the environment wins ---------------
config=${FEDRAD_CONFIG:-/etc/fedrad/fedrad.env}
if [ -n "${FEDRAD_CONFIG:-}" ] && [ ! -r "$config" ]; then
  die "FEDRAD_CONFIG=$config: no such readable file"
fi
if [ -r "$config" ]; then
  lineno=0
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    case "$line" in '' | '#'*) continue ;; esac
    key=${line%%=*}
    value=${line#*=}
    case "$key" in
      FEDRAD_* | FLWR_* | CUDA_VISIBLE_DEVICES | OMP_NUM_THREADS) ;;
      *) die "$config line $lineno: '$key' is not a FEDRAD_ setting (KEY=VALUE, one per line)" ;;
    esac
    case "$key" in *[!A-Za-z0-9_]* | '' | "$line") die "$config line $lineno: not KEY=VALUE" ;; esac
    # Values are data, never shell code: no eval of the value, quotes are not interpreted.
    already=
    eval "already=\${$key+set}"
    [ "$already" = set ] || export "$key=$value"
  done < "$config"
fi

export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
export PYTHONUNBUFFERED=1
# A read-only root file system: scratch goes to $TMPDIR (an emptyDir / tmpfs), never to the image.
tmp=${TMPDIR:-/tmp}
export FLWR_HOME="${FLWR_HOME:-$tmp/fedrad-flwr-home}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$tmp/fedrad-matplotlib}"
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$tmp/fedrad-xdg-cache}"

fedrad_bin=${FEDRAD_BIN:-fedrad}

is_on() { case "${1:-}" in 1 | true | yes | on) return 0 ;; *) return 1 ;; esac; }

# Does this fedrad's `fedrad node` know a flag? (flags added in later fedrad versions: see below)
node_help=
node_supports() {
  [ -n "$node_help" ] || node_help=$("$fedrad_bin" node --help 2>&1) || true
  case "$node_help" in *"$1 "* | *"$1]"* | *"$1
"*) return 0 ;; esac
  return 1
}

run() {
  if is_on "${FEDRAD_DRY_RUN:-}"; then
    echo "$me: would run:"
    printf '%s\n' "$@"
    exit 0
  fi
  exec "$@"
}

need_tls_or_insecure() {
  if [ -z "${FEDRAD_CERTS:-}" ] && ! is_on "${FEDRAD_INSECURE:-}"; then
    die "FEDRAD_CERTS is not set: give the certificate folder from \`fedrad certs init\` (TLS + node \
authentication), or FEDRAD_INSECURE=1 for plaintext on a trusted network"
  fi
  if [ -n "${FEDRAD_CERTS:-}" ] && [ ! -d "$FEDRAD_CERTS" ]; then
    die "FEDRAD_CERTS=$FEDRAD_CERTS: no such folder"
  fi
}

role=${1:-${FEDRAD_ROLE:-}}
[ $# -eq 0 ] || shift

case "$role" in
  coordinator)
    need_tls_or_insecure
    state=${FEDRAD_STATE_DIR:-/var/lib/fedrad}
    set -- "$fedrad_bin" coordinator --host "${FEDRAD_HOST:-0.0.0.0}" --port "${FEDRAD_PORT:-8000}" \
      --state "$state" "$@"
    [ -z "${FEDRAD_CERTS:-}" ] || set -- "$@" --certs "$FEDRAD_CERTS"
    cd "$state" 2>/dev/null || true
    run "$@"
    ;;

  node)
    need_tls_or_insecure
    [ -n "${FEDRAD_SUPERLINK:-}" ] || die "FEDRAD_SUPERLINK is not set: the coordinator's HOST:PORT"
    if [ -n "${FEDRAD_CERTS:-}" ] && [ -z "${FEDRAD_SITE:-}" ]; then
      die "FEDRAD_SITE is not set: this site's name, as in \`fedrad certs init --sites\`"
    fi
    data=${FEDRAD_DATA:-/data/dicom}
    state=${FEDRAD_STATE_DIR:-/var/lib/fedrad/state}
    set -- "$fedrad_bin" node --data "$data" --superlink "$FEDRAD_SUPERLINK" \
      --cache "${FEDRAD_CACHE_DIR:-/var/cache/fedrad}" --device "${FEDRAD_DEVICE:-auto}" \
      --port "${FEDRAD_NODE_PORT:-9094}" --audit-dir "${FEDRAD_AUDIT_DIR:-$state/audit}" "$@"
    [ -z "${FEDRAD_CERTS:-}" ] || set -- "$@" --certs "$FEDRAD_CERTS"
    [ -z "${FEDRAD_SITE:-}" ] || set -- "$@" --site-name "$FEDRAD_SITE"
    [ -z "${FEDRAD_LABELS:-}" ] || set -- "$@" --labels "$FEDRAD_LABELS"
    is_on "${FEDRAD_SCAN:-1}" || set -- "$@" --no-scan
    # Flags of newer fedrad versions. A setting that tightens what the site accepts (a policy, the
    # consortium key) makes the start fail on a fedrad without the flag: never silently ignored.
    if node_supports --state-dir; then set -- "$@" --state-dir "$state"; fi
    if [ -n "${FEDRAD_POLICY:-}" ]; then
      node_supports --policy || die "FEDRAD_POLICY is set but this fedrad has no \`node --policy\`"
      set -- "$@" --policy "$FEDRAD_POLICY"
    fi
    if [ -n "${FEDRAD_CONSORTIUM_KEY:-}" ]; then
      node_supports --consortium-key ||
        die "FEDRAD_CONSORTIUM_KEY is set but this fedrad has no \`node --consortium-key\`"
      set -- "$@" --consortium-key "$FEDRAD_CONSORTIUM_KEY"
    fi
    if is_on "${FEDRAD_ALLOW_UNSIGNED:-}" && node_supports --allow-unsigned; then
      set -- "$@" --allow-unsigned
    fi
    if is_on "${FEDRAD_INSECURE:-}" && [ -z "${FEDRAD_CERTS:-}" ] && node_supports --insecure; then
      set -- "$@" --insecure
    fi
    cd "$state" 2>/dev/null || true
    run "$@"
    ;;

  init)
    # The compose demo consortium: what `fedrad demo --secure` makes before it starts processes.
    out=${FEDRAD_INIT_DIR:-/consortium}
    sites=${FEDRAD_SITES:-site-a,site-b,site-c}
    if [ -e "$out/certs/ca.pem" ]; then
      # A second `compose up` must not replace the CA under nodes that already trust it.
      echo "$me: $out/certs/ca.pem exists: keeping the consortium in $out"
      exit 0
    fi
    if is_on "${FEDRAD_DRY_RUN:-}"; then
      echo "$me: would run:"
      printf '%s\n' "$fedrad_bin" certs init --out "$out/certs" --sites "$sites" \
        --hosts "${FEDRAD_CERT_HOSTS:-coordinator,localhost,127.0.0.1,::1}"
      exit 0
    fi
    mkdir -p "$out"
    "$fedrad_bin" certs init --out "$out/certs" --sites "$sites" \
      --hosts "${FEDRAD_CERT_HOSTS:-coordinator,localhost,127.0.0.1,::1}"
    "$fedrad_bin" keys generate --out "$out/certs/consortium"
    if is_on "${FEDRAD_SYNTHETIC:-1}"; then
      # deploy/synthetic.py: the same synthetic hospitals `fedrad demo` writes (one folder per site).
      python=$(dirname "$(command -v "$fedrad_bin")")/python
      [ -x "$python" ] || python=python3
      "$python" -c 'import sys
from fedrad.deploy.synthetic import write_synthetic_sites
for p in write_synthetic_sites(sys.argv[1], n_sites=int(sys.argv[2]), seed=0): print("fedrad-entrypoint: wrote", p)' \
        "$out/sites" "$(echo "$sites" | tr ',' '\n' | grep -c .)"
    fi
    # Each site's container reads only its own key; ca.key stays with the consortium operator.
    echo "$me: consortium written to $out (certs/, sites/); keep $out/certs/ca.key offline"
    ;;

  register)
    # Enrol site public keys (flwr supernode register over TLS) once the coordinator listens.
    [ -n "${FEDRAD_CERTS:-}" ] || die "FEDRAD_CERTS is not set: the folder holding the consortium's ca.pem"
    [ -n "${FEDRAD_SUPERLINK:-}" ] || die "FEDRAD_SUPERLINK is not set: the coordinator's HOST:PORT"
    keys=${FEDRAD_REGISTER_KEYS:-$*}
    [ -n "$keys" ] || die "no public keys: set FEDRAD_REGISTER_KEYS (comma separated) or pass key files"
    for key in $(echo "$keys" | tr ',' ' '); do
      if is_on "${FEDRAD_DRY_RUN:-}"; then
        echo "$me: would run:"
        printf '%s\n' "$fedrad_bin" certs register "$key" --certs "$FEDRAD_CERTS" --superlink "$FEDRAD_SUPERLINK"
        continue
      fi
      "$fedrad_bin" certs register "$key" --certs "$FEDRAD_CERTS" --superlink "$FEDRAD_SUPERLINK"
    done
    ;;

  healthcheck)
    role=${FEDRAD_ROLE:-node}
    if [ "$role" = coordinator ]; then port=${FEDRAD_PORT:-8000}; else port=${FEDRAD_NODE_PORT:-9094}; fi
    python=$(dirname "$(command -v "$fedrad_bin")")/python
    [ -x "$python" ] || python=python3
    exec "$python" -c 'import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3).close()' "$port"
    ;;

  "")
    die "no role: give coordinator, node, init, register, healthcheck or fedrad arguments"
    ;;

  *)
    run "$fedrad_bin" "$role" "$@"
    ;;
esac
