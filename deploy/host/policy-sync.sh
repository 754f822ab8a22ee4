#!/bin/sh
# policy-sync: keep the node's /etc/criproxy/policies.yaml equal to the policies.yaml of the
# criproxy-config ConfigMap. Runs as the DaemonSet's policy-sync container.
#
# Every --interval seconds: when the ConfigMap's version differs from the node's, snapshot it,
# run `criproxy policy check` on the snapshot and, only when that accepts it, write the snapshot
# beside the node's file and rename it over (atomic: criproxy, which watches the directory and
# reloads on change, never reads half a file). An invalid version is REFUSED: the node keeps the
# policy it has, the problems are logged as ERROR (again every 10 minutes while it lasts), and
# the container reports not ready, so `kubectl get ds -n criproxy-system` shows it.
#
# Usage: policy-sync.sh [--root DIR] [--source FILE] [--interval SECONDS] [--status-dir DIR]
#                       [--once | --ready [--readyz-url URL]]
#   --root DIR        the host's file system (default /host)
#   --source FILE     the ConfigMap's policies.yaml (default /etc/criproxy-config/policies.yaml)
#   --interval S      seconds between checks (default 10)
#   --status-dir DIR  scratch and status files (default /run/policy-sync)
#   --once            one pass; exit 0 when the node's file is (now) the ConfigMap's, 1 if refused
#   --ready           readiness probe: exit 0 when the last pass was in sync and criproxy on the
#                     node answers /readyz at --readyz-url (default http://127.0.0.1:9808/readyz;
#                     '' skips that check)
# Environment: CRIPROXY_BIN (default criproxy: the installer image's own, the same version the
# init container installed on the node).
set -eu

root=/host
source=/etc/criproxy-config/policies.yaml
interval=10
status_dir=/run/policy-sync
mode=loop
readyz_url=http://127.0.0.1:9808/readyz
criproxy=${CRIPROXY_BIN:-criproxy}
remind_every=600

log() { echo "policy-sync: $*" >&2; }

while [ $# -gt 0 ]; do
    case $1 in
        --root) root=${2%/}; shift 2 ;;
        --source) source=$2; shift 2 ;;
        --interval) interval=$2; shift 2 ;;
        --status-dir) status_dir=$2; shift 2 ;;
        --readyz-url) readyz_url=$2; shift 2 ;;
        --once) mode=once; shift ;;
        --ready) mode=ready; shift ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) log "unknown argument $1"; exit 2 ;;
    esac
done

dst=$root/etc/criproxy/policies.yaml
refused=$status_dir/refused
synced=$status_dir/synced
last_reminder=0

digest() { sha256sum "$1" | cut -c1-16; }

refuse() {   # refuse KEY TEXT: log TEXT's lines (once per KEY, then every 10 minutes); not ready
    key=$1
    now=$(date +%s)
    if [ "$mode" = once ] || [ "$key" != "$(cat "$refused" 2>/dev/null || true)" ] ||
        [ $((now - last_reminder)) -ge "$remind_every" ]; then
        printf '%s\n' "$2" | while IFS= read -r line; do log "ERROR: $line"; done
        last_reminder=$now
    fi
    printf '%s\n' "$key" >"$refused"
    rm -f "$synced"
    return 1
}

sync_once() {
    mkdir -p "$status_dir/check"
    if [ ! -f "$source" ]; then
        refuse missing "no $source: the criproxy-config ConfigMap has no policies.yaml key; the node keeps its policy"
        return 1
    fi
    snapshot=$status_dir/check/policies.yaml
    cp "$source" "$snapshot"
    if [ -f "$dst" ] && cmp -s "$snapshot" "$dst"; then
        rm -f "$refused"
        touch "$synced"
        return 0
    fi
    new=$(digest "$snapshot")
    if ! problems=$("$criproxy" policy check "$snapshot" 2>&1); then
        old=none
        [ ! -f "$dst" ] || old=$(digest "$dst")
        # The check names the snapshot; name the ConfigMap's file instead.
        problems=$(printf '%s\n' "$problems" | sed "s|$snapshot|$source|g")
        refuse "$new" "REFUSING policies.yaml $new from the ConfigMap: criproxy policy check rejects it; the node keeps policy $old
$problems"
        return 1
    fi
    dir=$(dirname "$dst")
    if [ ! -d "$dir" ]; then
        refuse nodir "$dir does not exist: criproxy is not installed on this node"
        return 1
    fi
    old=none
    [ ! -f "$dst" ] || old=$(digest "$dst")
    tmp=$dir/.policies.yaml.policy-sync.$$
    cp "$snapshot" "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$dst"
    log "installed policies.yaml $new on the node (was $old); criproxy reloads it"
    rm -f "$refused"
    touch "$synced"
}

case $mode in
    once)
        sync_once ;;
    ready)
        if [ -f "$refused" ]; then echo "not ready: policies.yaml refused ($(cat "$refused"))"; exit 1; fi
        if [ ! -f "$synced" ]; then echo "not ready: policies.yaml not synced yet"; exit 1; fi
        [ -z "$readyz_url" ] || exec python3 -c '
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=3).read()
except Exception as error:
    sys.exit(f"not ready: criproxy on the node: {sys.argv[1]}: {error}")' "$readyz_url" ;;
    loop)
        trap 'exit 0' TERM INT
        log "keeping $dst equal to $source (every ${interval}s)"
        while :; do
            sync_once || true
            sleep "$interval" &
            wait $! || true
        done ;;
esac
