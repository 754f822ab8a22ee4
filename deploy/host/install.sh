#!/usr/bin/env bash
# criproxy-install: install, upgrade, roll back and remove criproxy as a host service, and
# switch the kubelet to it and back. Run by the DaemonSet's init container (--root /host), or by
# hand on a node (it is also installed there as /usr/local/sbin/criproxy-install).
#
# Usage: install.sh COMMAND [OPTIONS]
#
# Commands
#   install            make this node run the criproxy wheel in --wheels: a virtualenv in
#                      /opt/criproxy/<version>, /opt/criproxy/current, /usr/local/bin/criproxy,
#                      the systemd unit and kubelet drop-in, /etc/criproxy/*; start the service,
#                      or reload it (zero-downtime takeover) when something changed. Idempotent.
#   upgrade            the same, but refuses when nothing is installed yet.
#   rollback           point /opt/criproxy/current at the previous version and reload.
#   uninstall          restore the kubelet FIRST (if it points at criproxy), then stop the
#                      service and remove exactly what the manifest says was added.
#   configure-kubelet  point the kubelet at criproxy's socket: containerRuntimeEndpoint and
#                      imageServiceEndpoint in the KubeletConfiguration file, and the
#                      --container-runtime-endpoint / --image-service-endpoint flags where the
#                      kubelet's flags file sets them. Refuses unless the proxy answers Version
#                      and forwards to the runtime the kubelet uses now. Records the old values.
#   restore-kubelet    put the recorded values back and restart the kubelet.
#   status             what is installed and running.
#
# Options
#   --root DIR             the host's file system (default /; the DaemonSet uses /host). With a
#                          root other than /, programs of the host (python3, systemctl) run in it
#                          with chroot.
#   --wheels DIR           wheelhouse: the criproxy wheel and its dependencies, plus a pip wheel
#                          (default $CRIPROXY_WHEELS or /dist, as in the installer image).
#   --config-dir DIR       criproxy.yaml, criproxy.env, policies.yaml to install when the host
#                          has none (or has an unedited older one); files missing there come from
#                          the shipped defaults (deploy/etc/criproxy). The DaemonSet passes its
#                          ConfigMap.
#   --version NAME         name of the version directory (default: the wheel's version).
#   --python PATH          interpreter that makes the virtualenv (default $CRIPROXY_HOST_PYTHON or
#                          python3; needs 3.11+).
#   --no-chroot            run --python and the installed criproxy directly, with paths under
#                          --root, instead of chrooting into it (tests, image builds).
#   --system-site-packages the virtualenv also sees --python's packages, so dependencies need
#                          not be in --wheels (tests and offline development only).
#   --no-systemd           never call systemctl: only lay down the files (node image builds,
#                          tests). The service is enabled by its multi-user.target.wants link.
#   --kubelet-config PATH  KubeletConfiguration file (default /var/lib/kubelet/config.yaml).
#   --kubelet-flags-file PATH  file with the kubelet's extra flags (default
#                          /var/lib/kubelet/kubeadm-flags.env, when it exists).
#   --no-restart-kubelet   edit the kubelet's files but leave restarting it to you.
#   --force                configure-kubelet: skip the proxy and runtime checks; uninstall:
#                          continue although the kubelet points at criproxy and nothing recorded
#                          how it was configured before.
#   --purge                uninstall: also remove config files edited on this host, and the logs.
#
# Everything added is listed in /var/lib/criproxy/manifest (under --root); uninstall removes
# those entries in reverse order and nothing else.
set -euo pipefail
umask 022

PROG=criproxy-install
SELF=$(readlink -f "$0")
SHARE=$(cd "$(dirname "$SELF")/.." && pwd)   # holds host/, systemd/, etc/criproxy/, README.md

OPT=/opt/criproxy
STATE=/var/lib/criproxy
MANIFEST=$STATE/manifest
CONFFILES=$STATE/conffiles
KUBELET_STATE=$STATE/kubelet.state
KUBELET_BACKUP=$STATE/kubelet-backup
LOCK=$STATE/install.lock
UNIT=/etc/systemd/system/criproxy.service
UNIT_WANTS=/etc/systemd/system/multi-user.target.wants/criproxy.service
DROPIN=/etc/systemd/system/kubelet.service.d/20-criproxy.conf
ETC=/etc/criproxy
BIN_LINK=/usr/local/bin/criproxy
SBIN_LINK=/usr/local/sbin/criproxy-install
DEFAULT_LISTEN=unix:///run/criproxy/criproxy.sock
ABSENT='<absent>'

ROOT=/
WHEELS=${CRIPROXY_WHEELS:-/dist}
CONFIG_DIR=
VERSION=
PYTHON=${CRIPROXY_HOST_PYTHON:-python3}
CHROOT=auto
SYSTEM_SITE=no
SYSTEMD=yes
KUBELET_CONFIG=/var/lib/kubelet/config.yaml
KUBELET_FLAGS=/var/lib/kubelet/kubeadm-flags.env
KUBELET_FLAGS_GIVEN=no
RESTART_KUBELET=yes
FORCE=no
PURGE=no
COMMAND=

PREVIOUS_BEFORE=
CHANGED=0          # something the running service reads changed: reload it

note() { echo "$PROG: $*" >&2; }
die() { echo "$PROG: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo pipefail/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }

# ----------------------------------------------------------------------------- paths and running

# fs PATH: where this script reads and writes the host path PATH.
fs() { if [[ $ROOT == / ]]; then printf '%s' "$1"; else printf '%s%s' "$ROOT" "$1"; fi; }
# xp PATH: the host path PATH as the programs run by in_root see it.
xp() { if [[ $CHROOT == yes ]]; then printf '%s' "$1"; else fs "$1"; fi; }
# in_root CMD...: run a program of the host (python3, the installed criproxy) in the host's root.
in_root() { if [[ $CHROOT == yes ]]; then chroot "$ROOT" "$@"; else "$@"; fi; }
sysctl() {
    if [[ $ROOT == / ]]; then
        systemctl "$@"
    else
        # The host's systemctl talks to the host's systemd over /run/systemd/private (visible in
        # the chroot); without the variable it would see the chroot and ignore start/stop/reload.
        SYSTEMD_IGNORE_CHROOT=1 chroot "$ROOT" systemctl "$@"
    fi
}
sha256() { sha256sum "$1" | cut -d' ' -f1; }

# ----------------------------------------------------------------------------- the manifest

in_manifest() { [[ -f $(fs "$MANIFEST") ]] && grep -qxF -- "$1 $2" "$(fs "$MANIFEST")"; }
record() { in_manifest "$1" "$2" || printf '%s %s\n' "$1" "$2" >>"$(fs "$MANIFEST")"; }
unrecord() {
    local m; m=$(fs "$MANIFEST")
    grep -vxF -- "$1 $2" "$m" >"$m.tmp" || true
    mv -f "$m.tmp" "$m"
}

# The state directory holds the manifest, so the directories made for it are recorded after.
init_state() {
    local made=() d=$STATE
    while [[ ! -d $(fs "$d") ]]; do made=("$d" "${made[@]}"); d=$(dirname "$d"); done
    for d in "${made[@]}"; do mkdir -m 0755 "$(fs "$d")"; done
    chmod 0700 "$(fs "$STATE")"
    touch "$(fs "$MANIFEST")"
    for d in "${made[@]}"; do record d "$d"; done
}

LOCKED=no
take_lock() {
    [[ $LOCKED == no && -d $(fs "$STATE") ]] || return 0
    command -v flock >/dev/null || return 0
    exec 9>"$(fs "$LOCK")"
    flock -w 600 9 || die "another $PROG holds $(fs "$LOCK")"
    LOCKED=yes
}

ensure_dir() {
    local d=$1
    [[ -d $(fs "$d") ]] && return 0
    ensure_dir "$(dirname "$d")"
    mkdir -m 0755 "$(fs "$d")"
    record d "$d"
}

# copy_atomic SRC FILE MODE: FILE is replaced by a rename, never seen half written.
copy_atomic() {
    local tmp; tmp="$(dirname "$2")/.$(basename "$2").criproxy-tmp.$$"
    cp -- "$1" "$tmp"
    chmod "$3" "$tmp"
    mv -f -- "$tmp" "$2"
}

# install_owned SRC PATH MODE: a file that is criproxy's alone (unit, drop-in).
install_owned() {
    local src=$1 path=$2 f; f=$(fs "$2")
    if [[ -e $f || -L $f ]] && ! in_manifest f "$path"; then
        die "$path exists and was not installed by $PROG; move it away first"
    fi
    ensure_dir "$(dirname "$path")"
    if [[ ! -f $f ]] || ! cmp -s "$src" "$f"; then
        copy_atomic "$src" "$f" "$3"
        note "installed $path"
        CHANGED=1
    fi
    record f "$path"
}

conffile_hash() {
    if [[ -f $(fs "$CONFFILES") ]]; then awk -v p="$1" '$2 == p {print $1}' "$(fs "$CONFFILES")"; fi
}
set_conffile_hash() {
    local c; c=$(fs "$CONFFILES")
    touch "$c"
    { awk -v p="$1" '$2 != p' "$c"; printf '%s %s\n' "$(sha256 "$(fs "$1")")" "$1"; } >"$c.tmp"
    mv -f "$c.tmp" "$c"
}

# install_conffile SRC PATH: installed when absent; replaced while nobody edited what we put
# there; an operator's edit (or a file we did not install) is never overwritten.
install_conffile() {
    local src=$1 path=$2 f recorded; f=$(fs "$2"); recorded=$(conffile_hash "$2")
    ensure_dir "$(dirname "$path")"
    if [[ ! -e $f ]]; then
        copy_atomic "$src" "$f" 0644
        record f "$path"
        set_conffile_hash "$path"
        note "installed $path"
        CHANGED=1
    elif [[ -n $recorded && $(sha256 "$f") == "$recorded" ]]; then
        if ! cmp -s "$src" "$f"; then
            copy_atomic "$src" "$f" 0644
            set_conffile_hash "$path"
            note "updated $path (it was not edited on this host)"
            CHANGED=1
        fi
    elif ! cmp -s "$src" "$f"; then
        note "kept $path: edited on this host (or not installed by $PROG); the shipped version is $src"
    fi
}

set_link() {   # set_link PATH TARGET
    local l; l=$(fs "$1")
    ensure_dir "$(dirname "$1")"
    ln -sfn -- "$2" "$l.criproxy-tmp"
    mv -Tf -- "$l.criproxy-tmp" "$l"
    record l "$1"
}

config_source() {   # the file NAME from --config-dir, else the shipped default
    if [[ -n $CONFIG_DIR && -f $CONFIG_DIR/$1 ]]; then printf '%s' "$CONFIG_DIR/$1"; else printf '%s' "$SHARE/etc/criproxy/$1"; fi
}

current_version() { readlink "$(fs "$OPT/current")" 2>/dev/null || true; }
previous_version() { readlink "$(fs "$OPT/previous")" 2>/dev/null || true; }

# ----------------------------------------------------------------------------- one version

find_wheel() {
    local wheels=()
    shopt -s nullglob
    wheels=("$WHEELS"/criproxy-*.whl)
    shopt -u nullglob
    [[ ${#wheels[@]} -eq 1 ]] || die "expected exactly one criproxy-*.whl in $WHEELS, found ${#wheels[@]}"
    WHEEL=${wheels[0]}
    WHEEL_VERSION=$(basename "$WHEEL" | cut -d- -f2)
    [[ -n $VERSION ]] || VERSION=$WHEEL_VERSION
    [[ $VERSION =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ && $VERSION != current && $VERSION != previous ]] ||
        die "--version '$VERSION' is not a usable directory name"
}

check_python() {
    local found
    found=$(in_root "$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>&1) ||
        die "cannot run $PYTHON on the host ($found); criproxy needs Python 3.11 or newer there (--python)"
    in_root "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON on the host is Python $found; criproxy needs 3.11 or newer (--python python3.11)"
}

pip_install() {   # pip_install VDIR ARGS...: pip from the wheelhouse (a venv made --without-pip has none)
    local vdir=$1 pipwheel; shift
    pipwheel=$(find "$(fs "$vdir/.wheels")" -maxdepth 1 -name 'pip-*.whl' | sort | tail -n 1)
    local pip=("$(xp "$vdir/bin/python")" -m pip)
    [[ -z $pipwheel ]] || pip=("$(xp "$vdir/bin/python")" "$(xp "$vdir/.wheels/$(basename "$pipwheel")")/pip")
    in_root env -u PYTHONPATH -u PYTHONHOME PIP_CONFIG_FILE=/dev/null "${pip[@]}" install --quiet \
        --no-index --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --no-warn-script-location "$@"
}

build_version() {
    local vdir=$OPT/$VERSION want marker
    want=$(sha256 "$WHEEL")
    marker=$(fs "$vdir/.criproxy-installed")
    if [[ -f $marker && $(cat "$marker") == "$want" ]]; then
        note "$vdir already holds $(basename "$WHEEL")"
        return 0
    fi
    if [[ $(current_version) == "$VERSION" ]]; then
        die "$vdir is the version in use and was built from another wheel; install this one under another --version"
    fi
    check_python
    note "building $vdir from $(basename "$WHEEL") (offline, from $WHEELS)"
    ensure_dir "$OPT"
    record t "$vdir"   # before it exists: a failed build is still removed by uninstall
    rm -rf -- "$(fs "$vdir")"
    mkdir -m 0755 "$(fs "$vdir")"
    mkdir "$(fs "$vdir/.wheels")"
    cp -- "$WHEELS"/*.whl "$(fs "$vdir/.wheels")/"
    local venv_args=(--without-pip)
    [[ $SYSTEM_SITE == no ]] || venv_args+=(--system-site-packages)
    in_root "$PYTHON" -m venv "${venv_args[@]}" "$(xp "$vdir")"
    local wheel_in_root; wheel_in_root=$(xp "$vdir/.wheels/$(basename "$WHEEL")")
    # criproxy itself into the venv (even when --system-site-packages shows another copy), then
    # whatever of its dependencies the venv does not see yet, from the wheelhouse only.
    pip_install "$vdir" --no-deps --ignore-installed "$wheel_in_root"
    pip_install "$vdir" --find-links "$(xp "$vdir/.wheels")" "$wheel_in_root"
    rm -rf -- "$(fs "$vdir/.wheels")"
    mkdir -p "$(fs "$vdir/share/criproxy")" "$(fs "$vdir/libexec")"
    cp -R -- "$SHARE/host" "$SHARE/systemd" "$SHARE/etc" "$(fs "$vdir/share/criproxy")/"
    [[ ! -f $SHARE/README.md ]] || cp -- "$SHARE/README.md" "$(fs "$vdir/share/criproxy")/"
    ln -s ../share/criproxy/host/criproxy-takeover "$(fs "$vdir/libexec/criproxy-takeover")"
    ln -s ../share/criproxy/host/install.sh "$(fs "$vdir/libexec/criproxy-install")"
    local said
    said=$(in_root "$(xp "$vdir/bin/criproxy")" --version 2>&1) || die "the new $vdir/bin/criproxy does not run: $said"
    [[ $said == "criproxy $WHEEL_VERSION" ]] || die "$vdir/bin/criproxy says '$said', expected 'criproxy $WHEEL_VERSION'"
    printf '%s\n' "$want" >"$marker"
    note "built $vdir ($said)"
}

prune_versions() {   # keep current and previous
    local cur prev type path
    cur=$(current_version); prev=$(previous_version)
    while read -r type path; do
        [[ $type == t && $path == "$OPT"/* ]] || continue
        case ${path#"$OPT"/} in "$cur"|"$prev") continue ;; esac
        rm -rf -- "$(fs "$path")"
        unrecord t "$path"
        note "removed old version $path"
    done < <(cat "$(fs "$MANIFEST")")
}

install_policies() {
    local dst=$ETC/policies.yaml src tmp
    [[ ! -e $(fs "$dst") ]] || return 0
    src=$(config_source policies.yaml)
    tmp=$ETC/.policies.yaml.criproxy-tmp.$$
    cp -- "$src" "$(fs "$tmp")"
    chmod 0644 "$(fs "$tmp")"
    if ! in_root "$(xp "$OPT/current/bin/criproxy")" policy check "$(xp "$tmp")" >/dev/null; then
        rm -f -- "$(fs "$tmp")"
        die "$src is not a valid policy file (above); not installed"
    fi
    mv -f -- "$(fs "$tmp")" "$(fs "$dst")"
    record f "$dst"
    note "installed $dst"
    CHANGED=1
}

# ----------------------------------------------------------------------------- commands

cmd_install() {
    local mode=$1 before
    find_wheel
    init_state
    take_lock
    before=$(current_version)
    PREVIOUS_BEFORE=$(previous_version)
    [[ $mode != upgrade || -n $before ]] || die "nothing to upgrade: criproxy is not installed under $ROOT (use install)"
    build_version
    if [[ $before != "$VERSION" ]]; then
        [[ -z $before ]] || set_link "$OPT/previous" "$before"
        set_link "$OPT/current" "$VERSION"
        note "$OPT/current -> $VERSION${before:+ (was $before)}"
        CHANGED=1
    fi
    # The DaemonSet's policy-sync volume makes /etc/criproxy (empty) before this runs: an empty
    # /etc/criproxy was made for criproxy, so it is criproxy's to remove again.
    if [[ -d $(fs "$ETC") ]] && ! in_manifest d "$ETC" && [[ -z $(ls -A "$(fs "$ETC")") ]]; then
        record d "$ETC"
    fi
    local f
    for f in criproxy.yaml criproxy.env; do install_conffile "$(config_source "$f")" "$ETC/$f"; done
    install_policies
    install_owned "$SHARE/systemd/criproxy.service" "$UNIT" 0644
    install_owned "$SHARE/systemd/kubelet-criproxy.conf" "$DROPIN" 0644
    # What `systemctl enable` does for WantedBy=multi-user.target, without needing systemd.
    [[ -L $(fs "$UNIT_WANTS") ]] || [[ ! -e $(fs "$UNIT_WANTS") ]] || die "$UNIT_WANTS exists and is not a link"
    set_link "$UNIT_WANTS" "$UNIT"
    local link target
    for link in "$BIN_LINK:../../../opt/criproxy/current/bin/criproxy" \
                "$SBIN_LINK:../../../opt/criproxy/current/libexec/criproxy-install"; do
        target=${link#*:}; link=${link%%:*}
        if [[ -e $(fs "$link") || -L $(fs "$link") ]] && ! in_manifest l "$link"; then
            note "left $link alone: it exists and is not ours"
        else
            set_link "$link" "$target"
        fi
    done
    apply_service "$before"
    prune_versions
    note "criproxy $VERSION installed under $ROOT"
}

# Start the service, or hand it over to the new files without refusing a call.
apply_service() {
    local before=$1
    if [[ $SYSTEMD == no ]]; then
        note "--no-systemd: files laid down; the service starts at the next boot (or: systemctl daemon-reload && systemctl start criproxy)"
        return 0
    fi
    sysctl daemon-reload
    if sysctl is-active --quiet criproxy.service; then
        [[ $CHANGED == 1 ]] || { note "criproxy.service is running and nothing changed"; return 0; }
        note "systemctl reload criproxy: the new process takes the socket over, the old one drains"
        if ! sysctl reload criproxy.service; then
            if [[ -n $before && $before != "$VERSION" ]]; then
                set_link "$OPT/current" "$before"
                [[ -z $PREVIOUS_BEFORE ]] || set_link "$OPT/previous" "$PREVIOUS_BEFORE"
            fi
            die "the takeover failed; the running criproxy keeps serving and $OPT/current points at ${before:-$VERSION} again (journalctl -u criproxy)"
        fi
    else
        note "systemctl start criproxy"
        sysctl start criproxy.service ||
            die "criproxy.service did not start; see journalctl -u criproxy -n 50 (the kubelet is not pointed at it yet unless you did so)"
    fi
}

cmd_rollback() {
    init_state
    take_lock
    local cur prev
    cur=$(current_version); prev=$(previous_version)
    PREVIOUS_BEFORE=$prev
    [[ -n $prev && -d $(fs "$OPT/$prev") ]] || die "no previous version to roll back to"
    set_link "$OPT/current" "$prev"
    set_link "$OPT/previous" "$cur"
    note "$OPT/current -> $prev (was $cur)"
    CHANGED=1
    VERSION=$prev
    apply_service "$cur"
}

# ----------------------------------------------------------------------------- kubelet

yaml_key() {   # yaml_key FILE KEY: the top-level scalar, or ABSENT
    local line value
    line=$(grep -E "^$2:" "$1" | tail -n 1) || { printf '%s' "$ABSENT"; return 0; }
    value=${line#*:}
    value=${value%%#*}
    value=$(printf '%s' "$value" | sed -E 's/^[[:space:]]+//; s/[[:space:]]+$//; s/^"(.*)"$/\1/'"; s/^'(.*)'$/\\1/")
    printf '%s' "$value"
}
yaml_set() {   # yaml_set FILE KEY VALUE|ABSENT
    if [[ $3 == "$ABSENT" ]]; then
        sed -i -E "/^$2:/d" "$1"
    elif grep -qE "^$2:" "$1"; then
        sed -i -E "s|^$2:.*\$|$2: $3|" "$1"
    else
        [[ ! -s $1 || $(tail -c 1 "$1" | od -An -c | tr -d ' ') == '\n' ]] || echo >>"$1"
        printf '%s: %s\n' "$2" "$3" >>"$1"
    fi
}
flag_value() {   # flag_value FILE FLAG: the flag's value in a kubelet flags file, or ABSENT
    local m
    m=$(grep -oE -- "--$2[= ][^\" ]+" "$1" | tail -n 1) || { printf '%s' "$ABSENT"; return 0; }
    printf '%s' "${m#--"$2"?}"
}
flag_set() { sed -i -E "s#--$2[= ][^\" ]+#--$2=$3#g" "$1"; }

# The same socket, however it is written (unix://, /var/run is /run).
norm_endpoint() { local e=${1#unix://}; e=${e#unix:}; [[ $e != /var/run/* ]] || e=/run/${e#/var/run/}; printf '%s' "$e"; }

criproxy_setting() {   # a top-level key of the installed criproxy.yaml, or ABSENT
    local f; f=$(fs "$ETC/criproxy.yaml")
    if [[ -f $f ]]; then yaml_key "$f" "$1"; else printf '%s' "$ABSENT"; fi
}
proxy_endpoint() { local l; l=$(criproxy_setting listen); [[ $l != "$ABSENT" && -n $l ]] || l=$DEFAULT_LISTEN; printf '%s' "$l"; }

validator_python() {
    if [[ -x $(fs "$OPT/current/bin/python") ]]; then xp "$OPT/current/bin/python"; else printf '%s' "$PYTHON"; fi
}

# check_kubelet_yaml FILE KEY=VALUE...: the edited file still parses as a KubeletConfiguration
# and has exactly these values (ABSENT: no such key).
check_kubelet_yaml() {
    local file=$1; shift
    in_root "$(validator_python)" - "$(xp "$file")" "$@" <<'EOF'
import sys
import yaml
path, expected = sys.argv[1], sys.argv[2:]
with open(path) as stream:
    doc = yaml.safe_load(stream)
if not isinstance(doc, dict):
    sys.exit(f"{path}: not a YAML mapping after editing")
if doc.get("kind", "KubeletConfiguration") != "KubeletConfiguration":
    sys.exit(f"{path}: kind is {doc.get('kind')!r}, not KubeletConfiguration")
for pair in expected:
    key, _, value = pair.partition("=")
    actual = doc.get(key, "<absent>")
    if actual != value:
        sys.exit(f"{path}: {key} would be {actual!r} after editing, expected {value!r}")
EOF
}

# Ask the proxy for Version: it answers only when it serves and reaches the runtime.
check_proxy_answers() {
    local socket; socket=$(norm_endpoint "$1")
    in_root "$(xp "$OPT/current/bin/python")" - "unix://$socket" <<'EOF' ||
import sys
import grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    try:
        channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5)
    except grpc.RpcError as error:
        sys.exit(f"{sys.argv[1]}: Version failed: {error.code().name}: {error.details()}")
EOF
        die "criproxy does not answer on $1 (is criproxy.service running and the runtime up?); the kubelet was not changed"
}

restart_kubelet() {
    if [[ $RESTART_KUBELET == no || $SYSTEMD == no ]]; then
        note "restart the kubelet yourself for this to take effect: systemctl restart kubelet"
        return 0
    fi
    note "systemctl restart kubelet"
    sysctl restart kubelet.service || die "systemctl restart kubelet failed (journalctl -u kubelet)"
    local i
    for i in $(seq 1 30); do
        sysctl is-active --quiet kubelet.service && return 0
        sleep 1
    done
    die "kubelet.service is not active 30s after the restart (journalctl -u kubelet)"
}

flags_file() {   # the kubelet flags file to consider, or empty
    if [[ -f $(fs "$KUBELET_FLAGS") ]]; then printf '%s' "$KUBELET_FLAGS"
    elif [[ $KUBELET_FLAGS_GIVEN == yes ]]; then die "--kubelet-flags-file $KUBELET_FLAGS does not exist"
    fi
}

cmd_configure_kubelet() {
    local cfg=$KUBELET_CONFIG proxy runtime flags cfg_rt cfg_img flag_rt flag_img effective
    [[ -f $(fs "$cfg") ]] || die "no KubeletConfiguration at $cfg (--kubelet-config)"
    [[ -e $(fs "$OPT/current") || $FORCE == yes ]] || die "criproxy is not installed under $ROOT; run install first"
    init_state
    take_lock
    proxy=$(proxy_endpoint)
    runtime=$(criproxy_setting runtime-endpoint)
    flags=$(flags_file)
    cfg_rt=$(yaml_key "$(fs "$cfg")" containerRuntimeEndpoint)
    cfg_img=$(yaml_key "$(fs "$cfg")" imageServiceEndpoint)
    flag_rt=$ABSENT; flag_img=$ABSENT
    if [[ -n $flags ]]; then
        flag_rt=$(flag_value "$(fs "$flags")" container-runtime-endpoint)
        flag_img=$(flag_value "$(fs "$flags")" image-service-endpoint)
    fi
    # A flag wins over the file.
    effective=$cfg_rt
    [[ $flag_rt == "$ABSENT" ]] || effective=$flag_rt
    if [[ $(norm_endpoint "$effective") == "$(norm_endpoint "$proxy")" ]]; then
        note "the kubelet already uses $proxy"
        return 0
    fi
    if [[ $FORCE == no ]]; then
        if [[ $runtime != "$ABSENT" && $effective != "$ABSENT" && $(norm_endpoint "$effective") != "$(norm_endpoint "$runtime")" ]]; then
            die "the kubelet uses $effective but criproxy forwards to $runtime: switching would change the runtime under the node's pods. Fix runtime-endpoint in $ETC/criproxy.yaml (or --force)"
        fi
        check_proxy_answers "$proxy"
    fi
    # Remember how it was (it does not name the proxy now, so these are the values to go back to).
    rm -rf -- "$(fs "$KUBELET_BACKUP")"
    mkdir -m 0700 "$(fs "$KUBELET_BACKUP")"
    cp -p -- "$(fs "$cfg")" "$(fs "$KUBELET_BACKUP")/config"
    [[ -z $flags ]] || cp -p -- "$(fs "$flags")" "$(fs "$KUBELET_BACKUP")/flags"
    # The old values are on disk before anything is edited.
    {
        echo "config=$cfg"
        echo "config.containerRuntimeEndpoint=$cfg_rt"
        echo "config.imageServiceEndpoint=$cfg_img"
        echo "flags=$flags"
        echo "flags.container-runtime-endpoint=$flag_rt"
        echo "flags.image-service-endpoint=$flag_img"
    } >"$(fs "$KUBELET_STATE").tmp"
    mv -f "$(fs "$KUBELET_STATE").tmp" "$(fs "$KUBELET_STATE")"
    edit_kubelet_config "$cfg" "$proxy" "$proxy"
    if [[ -n $flags ]]; then
        local tmp; tmp="$(fs "$flags").criproxy-tmp"
        cp -p -- "$(fs "$flags")" "$tmp"
        [[ $flag_rt == "$ABSENT" ]] || flag_set "$tmp" container-runtime-endpoint "$proxy"
        [[ $flag_img == "$ABSENT" ]] || flag_set "$tmp" image-service-endpoint "$proxy"
        mv -f -- "$tmp" "$(fs "$flags")"
        [[ $flag_rt == "$ABSENT" && $flag_img == "$ABSENT" ]] || note "pointed the flags in $flags at $proxy"
    fi
    # What the files look like now: restore puts the saved copies back only if nobody changed them since.
    {
        echo "config.sha256=$(sha256 "$(fs "$cfg")")"
        [[ -z $flags ]] || echo "flags.sha256=$(sha256 "$(fs "$flags")")"
    } >>"$(fs "$KUBELET_STATE")"
    note "pointed containerRuntimeEndpoint and imageServiceEndpoint in $cfg at $proxy (old values in $STATE)"
    restart_kubelet
}

edit_kubelet_config() {   # edit_kubelet_config PATH RUNTIME-VALUE IMAGE-VALUE (ABSENT: remove the key)
    local cfg=$1 tmp
    tmp="$(fs "$cfg").criproxy-tmp"
    cp -p -- "$(fs "$cfg")" "$tmp"
    yaml_set "$tmp" containerRuntimeEndpoint "$2"
    yaml_set "$tmp" imageServiceEndpoint "$3"
    if ! check_kubelet_yaml "${cfg}.criproxy-tmp" "containerRuntimeEndpoint=$2" "imageServiceEndpoint=$3"; then
        rm -f -- "$tmp"
        die "editing $cfg did not give a valid KubeletConfiguration (above); left it unchanged"
    fi
    mv -f -- "$tmp" "$(fs "$cfg")"
}

copy_back() {   # copy_back SAVED PATH: the saved copy (mode and owner too) replaces PATH by a rename
    local tmp; tmp="$(fs "$2").criproxy-tmp"
    cp -p -- "$(fs "$1")" "$tmp"
    mv -f -- "$tmp" "$(fs "$2")"
}

state_value() { awk -F= -v k="$1" '$1 == k {sub(/^[^=]*=/, ""); print; exit}' "$(fs "$KUBELET_STATE")"; }

cmd_restore_kubelet() {
    [[ ! -d $(fs "$STATE") ]] || take_lock
    local proxy cfg flags now want_rt want_img
    proxy=$(proxy_endpoint)
    if [[ ! -f $(fs "$KUBELET_STATE") ]]; then
        restore_unrecorded "$proxy"
        return 0
    fi
    cfg=$(state_value config)
    flags=$(state_value flags)
    if [[ -f $(fs "$cfg") && $(sha256 "$(fs "$cfg")") == "$(state_value config.sha256)" ]]; then
        # Nobody touched it since: put the saved file back byte for byte.
        copy_back "$KUBELET_BACKUP/config" "$cfg"
        note "restored $cfg from $KUBELET_BACKUP"
    elif [[ -f $(fs "$cfg") ]]; then
        want_rt=$(state_value config.containerRuntimeEndpoint)
        want_img=$(state_value config.imageServiceEndpoint)
        # Only keys that still name the proxy go back: a later change by someone else stands.
        now=$(yaml_key "$(fs "$cfg")" containerRuntimeEndpoint)
        [[ $(norm_endpoint "$now") == "$(norm_endpoint "$proxy")" ]] || want_rt=$now
        now=$(yaml_key "$(fs "$cfg")" imageServiceEndpoint)
        [[ $(norm_endpoint "$now") == "$(norm_endpoint "$proxy")" ]] || want_img=$now
        edit_kubelet_config "$cfg" "$want_rt" "$want_img"
        note "restored containerRuntimeEndpoint ($want_rt) and imageServiceEndpoint ($want_img) in $cfg"
    else
        note "$cfg is gone; nothing to restore there"
    fi
    if [[ -n $flags && -f $(fs "$flags") ]]; then
        if [[ $(sha256 "$(fs "$flags")") == "$(state_value flags.sha256)" ]]; then
            copy_back "$KUBELET_BACKUP/flags" "$flags"
        else
            local tmp flag old; tmp="$(fs "$flags").criproxy-tmp"
            cp -p -- "$(fs "$flags")" "$tmp"
            for flag in container-runtime-endpoint image-service-endpoint; do
                old=$(state_value "flags.$flag")
                now=$(flag_value "$tmp" "$flag")
                if [[ $old != "$ABSENT" && $(norm_endpoint "$now") == "$(norm_endpoint "$proxy")" ]]; then
                    flag_set "$tmp" "$flag" "$old"
                fi
            done
            mv -f -- "$tmp" "$(fs "$flags")"
        fi
        note "restored the runtime flags in $flags"
    fi
    restart_kubelet
    rm -rf -- "$(fs "$KUBELET_STATE")" "$(fs "$KUBELET_BACKUP")"
}

# Nothing recorded how the kubelet was configured: if it points at criproxy anyway (edited by
# hand), point it at criproxy's runtime-endpoint, which is where its calls went.
restore_unrecorded() {
    local proxy=$1 cfg=$KUBELET_CONFIG runtime now flags
    [[ -f $(fs "$cfg") ]] || { note "no $cfg and nothing recorded: the kubelet was not configured by $PROG"; return 0; }
    now=$(yaml_key "$(fs "$cfg")" containerRuntimeEndpoint)
    flags=$(flags_file)
    local flag_now=$ABSENT
    [[ -z $flags ]] || flag_now=$(flag_value "$(fs "$flags")" container-runtime-endpoint)
    if [[ $(norm_endpoint "$now") != "$(norm_endpoint "$proxy")" && $(norm_endpoint "$flag_now") != "$(norm_endpoint "$proxy")" ]]; then
        note "the kubelet does not use criproxy ($cfg); nothing to restore"
        return 0
    fi
    runtime=$(criproxy_setting runtime-endpoint)
    if [[ $runtime == "$ABSENT" ]]; then
        [[ $FORCE == yes ]] && return 0
        die "the kubelet uses criproxy ($proxy), nothing recorded its old endpoint and $ETC/criproxy.yaml names no runtime-endpoint; point it back by hand (or --force)"
    fi
    local img; img=$(yaml_key "$(fs "$cfg")" imageServiceEndpoint)
    [[ $(norm_endpoint "$img") != "$(norm_endpoint "$proxy")" ]] || img=$runtime
    [[ $(norm_endpoint "$now") != "$(norm_endpoint "$proxy")" ]] || now=$runtime
    edit_kubelet_config "$cfg" "$now" "$img"
    if [[ -n $flags && $(norm_endpoint "$flag_now") == "$(norm_endpoint "$proxy")" ]]; then
        flag_set "$(fs "$flags")" container-runtime-endpoint "$runtime"
    fi
    note "pointed the kubelet at $runtime (criproxy's runtime-endpoint; nothing had recorded its old value)"
    restart_kubelet
}

# ----------------------------------------------------------------------------- uninstall

cmd_uninstall() {
    if [[ ! -f $(fs "$MANIFEST") ]]; then
        note "nothing to remove: no $MANIFEST under $ROOT"
        return 0
    fi
    take_lock
    # The kubelet first: stopping the proxy while the kubelet still uses it is what this order avoids.
    cmd_restore_kubelet
    if [[ $SYSTEMD == yes ]]; then
        if sysctl cat criproxy.service >/dev/null 2>&1; then
            sysctl stop criproxy.service || die "systemctl stop criproxy failed; nothing removed"
            local what=runtime
            [[ $PURGE == no ]] || what=runtime,logs
            sysctl clean --what="$what" criproxy.service 2>/dev/null || true
        fi
    fi
    local entries=() i type path f
    mapfile -t entries <"$(fs "$MANIFEST")"
    for ((i = ${#entries[@]} - 1; i >= 0; i--)); do
        type=${entries[i]%% *}; path=${entries[i]#* }
        f=$(fs "$path")
        case $type in
            f)
                local recorded; recorded=$(conffile_hash "$path")
                if [[ -n $recorded && -f $f && $(sha256 "$f") != "$recorded" && $PURGE == no ]]; then
                    note "kept $path: edited on this host (--purge removes it)"
                else
                    rm -f -- "$f"
                fi ;;
            l) [[ ! -L $f ]] || rm -f -- "$f" ;;
            t) rm -rf -- "$f" ;;
            d)
                if [[ $path == "$STATE" ]]; then
                    rm -rf -- "$(fs "$KUBELET_STATE")" "$(fs "$KUBELET_BACKUP")" "$(fs "$CONFFILES")" \
                        "$(fs "$LOCK")" "$(fs "$MANIFEST")"
                fi
                rmdir -- "$f" 2>/dev/null || { [[ ! -d $f ]] || note "kept $path: not empty"; } ;;
            *) note "ignoring manifest line: ${entries[i]}" ;;
        esac
    done
    # The state directory existed before us: leave it, without our files.
    rm -f -- "$(fs "$MANIFEST")" "$(fs "$CONFFILES")" "$(fs "$LOCK")"
    [[ $SYSTEMD == no ]] || { sysctl daemon-reload; sysctl reset-failed criproxy.service 2>/dev/null || true; }
    note "criproxy removed from $ROOT"
}

cmd_status() {
    local cur prev
    cur=$(current_version); prev=$(previous_version)
    echo "root:      $ROOT"
    echo "current:   ${cur:-none}"
    echo "previous:  ${prev:-none}"
    if [[ -x $(fs "$OPT/current/bin/criproxy") ]]; then
        echo "runs:      $(in_root "$(xp "$OPT/current/bin/criproxy")" --version 2>&1 || true)"
    fi
    if [[ $SYSTEMD == yes ]]; then
        echo "service:   $(sysctl is-active criproxy.service 2>/dev/null || true)"
        echo "kubelet:   $(sysctl is-active kubelet.service 2>/dev/null || true)"
    fi
    if [[ -f $(fs "$KUBELET_CONFIG") ]]; then
        echo "endpoint:  $(yaml_key "$(fs "$KUBELET_CONFIG")" containerRuntimeEndpoint) ($KUBELET_CONFIG)"
    fi
    echo "proxy:     $(proxy_endpoint)"
}

# ----------------------------------------------------------------------------- main

while [[ $# -gt 0 ]]; do
    case $1 in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --wheels) WHEELS=${2:?--wheels needs a directory}; shift 2 ;;
        --config-dir) CONFIG_DIR=${2:?--config-dir needs a directory}; shift 2 ;;
        --version) VERSION=${2:?--version needs a name}; shift 2 ;;
        --python) PYTHON=${2:?--python needs a path}; shift 2 ;;
        --no-chroot) CHROOT=no; shift ;;
        --system-site-packages) SYSTEM_SITE=yes; shift ;;
        --no-systemd) SYSTEMD=no; shift ;;
        --kubelet-config) KUBELET_CONFIG=${2:?--kubelet-config needs a path}; shift 2 ;;
        --kubelet-flags-file) KUBELET_FLAGS=${2:?--kubelet-flags-file needs a path}; KUBELET_FLAGS_GIVEN=yes; shift 2 ;;
        --no-restart-kubelet) RESTART_KUBELET=no; shift ;;
        --force) FORCE=yes; shift ;;
        --purge) PURGE=yes; shift ;;
        -h|--help|help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $COMMAND ]] || die "one command at a time (got $COMMAND and $1)"; COMMAND=$1; shift ;;
    esac
done

[[ $ROOT == /* ]] || die "--root must be an absolute path"
[[ $ROOT == / ]] || ROOT=${ROOT%/}
[[ -d $ROOT ]] || die "--root $ROOT is not a directory"
if [[ $CHROOT == auto ]]; then
    if [[ $ROOT == / ]]; then CHROOT=no; else CHROOT=yes; fi
fi
[[ -z $CONFIG_DIR || -d $CONFIG_DIR ]] || die "--config-dir $CONFIG_DIR is not a directory"
if [[ $(id -u) != 0 && $ROOT == / ]]; then die "run as root"; fi

case $COMMAND in
    install) cmd_install install ;;
    upgrade) cmd_install upgrade ;;
    rollback) cmd_rollback ;;
    uninstall) cmd_uninstall ;;
    configure-kubelet) cmd_configure_kubelet ;;
    restore-kubelet) cmd_restore_kubelet ;;
    status) cmd_status ;;
    '') usage >&2; exit 2 ;;
    *) die "unknown command '$COMMAND' (see --help)" ;;
esac
