#!/usr/bin/env bash
# Install (or upgrade) storelink-agent on a Linux store machine as a systemd service.
#
#   sudo ./install-agent.sh [--dry-run] [--binary PATH] [--no-start] AGENT_TOML
#
# AGENT_TOML is the config `storelink-central stores add <store>` wrote for this store. The
# script checks it with the new binary before changing anything, then: installs the binary to
# $PREFIX/bin (keeping the one it replaces as storelink-agent.previous, for rollback), creates
# the system user, installs the config to /etc/storelink-agent/agent.toml (root:storelink-agent,
# 0640: it may hold the ingest token) with the NATS credentials and TLS files it names by
# relative paths, and
# the systemd unit, (re)starts the service and runs `storelink-agent check-config` and `status`
# as the service user. Running it again upgrades.
#
# --dry-run prints every command that would change the machine and changes nothing.
# For tests and staging, everything it touches can be redirected (none of these needs root):
#   PREFIX     where the binary goes                  [/usr/local]
#   DESTDIR    prepended to every path written        [empty: the real root]
#   SYSTEMCTL  the systemctl to call                  [systemctl]
#   USERADD    the useradd to call                    [useradd]
#   CHOWN      the chown to call                      [chown]
#   GETENT     answers "does the user exist?"         [getent]
#   RUNAS      runs a command as the service user     [runuser -u storelink-agent --]
#              (set it empty to run as yourself)
set -euo pipefail

AGENT_USER=storelink-agent
UNIT_NAME=storelink-agent.service
DEFAULT_STATE_DIR=/var/lib/storelink-agent
CONF_DIR=/etc/storelink-agent
UNIT_DIR=/etc/systemd/system

PREFIX="${PREFIX:-/usr/local}"
DESTDIR="${DESTDIR:-}"
SYSTEMCTL="${SYSTEMCTL:-systemctl}"
USERADD="${USERADD:-useradd}"
CHOWN="${CHOWN:-chown}"
GETENT="${GETENT:-getent}"
RUNAS="${RUNAS-runuser -u $AGENT_USER --}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
UNIT_SRC="$HERE/systemd/$UNIT_NAME"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "install-agent: $*" >&2
    exit 1
}

DRY_RUN=0
START=1
BINARY=""
CONFIG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --no-start) START=0 ;;
        --binary) [ $# -ge 2 ] || usage; BINARY="$2"; shift ;;
        --binary=*) BINARY="${1#--binary=}" ;;
        -h | --help) usage ;;
        -*) echo "install-agent: unknown option $1" >&2; usage ;;
        *) [ -z "$CONFIG" ] || usage; CONFIG="$1" ;;
    esac
    shift
done
[ -n "$CONFIG" ] || usage

# The binary: --binary, else next to this script (release bundle), else dist/ (source tree).
if [ -z "$BINARY" ]; then
    for candidate in "$HERE/storelink-agent" "$HERE/../dist/storelink-agent"; do
        if [ -x "$candidate" ]; then BINARY="$candidate"; break; fi
    done
fi
[ -n "$BINARY" ] || die "no storelink-agent binary next to this script or in dist/: pass --binary PATH"
[ -x "$BINARY" ] || die "$BINARY is not an executable file"
[ -f "$CONFIG" ] || die "$CONFIG does not exist (it is what 'storelink-central stores add' wrote)"
[ -f "$UNIT_SRC" ] || die "$UNIT_SRC is missing (keep systemd/ next to this script)"
if [ "$DRY_RUN" = 0 ] && [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or try --dry-run first"
fi

# Every command that changes the machine goes through run: printed, and executed unless --dry-run.
run() {
    local shown
    shown="$(printf '%q ' "$@")"
    echo "+ ${shown% }"
    if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

# The value of a string key in the TOML file as `stores add` writes it (key = "value").
toml_string() {
    sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\"\(.*\)\"[[:space:]]*\(#.*\)\{0,1\}$/\1/p" "$2" |
        head -n 1
}

# 1. Refuse a config the new binary cannot run, before anything is touched.
echo "checking $CONFIG with $BINARY"
"$BINARY" check-config "$CONFIG" || die "$CONFIG is not valid for this binary: nothing was installed"
DATA_DIR="$(toml_string data_dir "$CONFIG")"
DATA_DIR="${DATA_DIR:-$DEFAULT_STATE_DIR}"
DROP_DIR="$(toml_string drop_dir "$CONFIG")"

BIN="$PREFIX/bin/storelink-agent"
CONF="$CONF_DIR/agent.toml"
UNIT="$UNIT_DIR/$UNIT_NAME"
DROPIN_DIR="$UNIT_DIR/$UNIT_NAME.d"

# 2. The binary, swapped in by rename so a running agent never sees a half-written file.
run install -d -m 0755 "$DESTDIR$PREFIX/bin"
if [ -e "$DESTDIR$BIN" ]; then
    run cp -p "$DESTDIR$BIN" "$DESTDIR$BIN.previous"
fi
run install -m 0755 "$BINARY" "$DESTDIR$BIN.new"
run mv -f "$DESTDIR$BIN.new" "$DESTDIR$BIN"

# 3. The user the service runs as: no login, no home of its own beyond the state dir.
if $GETENT passwd "$AGENT_USER" >/dev/null 2>&1; then
    echo "user $AGENT_USER exists"
else
    run $USERADD --system --user-group --home-dir "$DEFAULT_STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "storelink store agent" "$AGENT_USER"
fi

# 4. The config: readable by the service, writable by root only (it may hold the token).
run install -d -m 0750 "$DESTDIR$CONF_DIR"
if [ -e "$DESTDIR$CONF" ] && ! cmp -s "$CONFIG" "$DESTDIR$CONF"; then
    run cp -p "$DESTDIR$CONF" "$DESTDIR$CONF.bak-$(date -u +%Y%m%dT%H%M%SZ)"
fi
run install -m 0640 "$CONFIG" "$DESTDIR$CONF"
run $CHOWN "root:$AGENT_USER" "$DESTDIR$CONF_DIR" "$DESTDIR$CONF"
# Relative credential and TLS paths are resolved against the config's directory: bring those
# files along, readable by root and the service user only (the seed and key are secrets).
for KEY in credentials tls_ca tls_cert tls_key; do
    FILE="$(toml_string "$KEY" "$CONFIG")"
    case "$FILE" in
        "" | /*) ;;
        *)
            SRC="$(dirname "$CONFIG")/$FILE"
            [ -f "$SRC" ] || die "nats.$KEY names $SRC, which does not exist"
            run install -D -m 0640 "$SRC" "$DESTDIR$CONF_DIR/$FILE"
            run $CHOWN "root:$AGENT_USER" "$DESTDIR$CONF_DIR/$FILE"
            ;;
    esac
done

# 5. The unit, pointing at this PREFIX's binary.
run install -d -m 0755 "$DESTDIR$UNIT_DIR"
run install -m 0644 "$UNIT_SRC" "$DESTDIR$UNIT"
if [ "$PREFIX" != /usr/local ]; then
    run sed -i "s#/usr/local/bin/storelink-agent#$BIN#" "$DESTDIR$UNIT"
fi
# The unit may write only its state dir; a data_dir or POSLog drop folder elsewhere needs a
# drop-in that opens it (and the directory must belong to the service user).
extra_paths=()
if [ "$DATA_DIR" != "$DEFAULT_STATE_DIR" ]; then extra_paths+=("$DATA_DIR"); fi
if [ -n "$DROP_DIR" ]; then extra_paths+=("$DROP_DIR"); fi
if [ ${#extra_paths[@]} -gt 0 ]; then
    run install -d -m 0755 "$DESTDIR$DROPIN_DIR"
    echo "+ write $DESTDIR$DROPIN_DIR/paths.conf: ReadWritePaths=${extra_paths[*]}"
    if [ "$DRY_RUN" = 0 ]; then
        printf '# Written by install-agent.sh from %s\n[Service]\nReadWritePaths=%s\n' \
            "$CONF" "${extra_paths[*]}" >"$DESTDIR$DROPIN_DIR/paths.conf"
    fi
    for dir in "${extra_paths[@]}"; do
        run install -d -m 0750 "$DESTDIR$dir"
        run $CHOWN "$AGENT_USER:$AGENT_USER" "$DESTDIR$dir"
    done
elif [ -e "$DESTDIR$DROPIN_DIR/paths.conf" ]; then
    run rm -f "$DESTDIR$DROPIN_DIR/paths.conf"
fi

# 6. Start it (restart: an upgrade replaces a running agent; Type=notify makes this wait until
# the new one answers HTTP), then check it from the service user's point of view.
run $SYSTEMCTL daemon-reload
run $SYSTEMCTL enable "$UNIT_NAME"
if [ "$START" = 1 ]; then
    run $SYSTEMCTL restart "$UNIT_NAME"
fi
run $RUNAS "$DESTDIR$BIN" check-config "$DESTDIR$CONF"
if [ "$START" = 1 ]; then
    run $RUNAS "$DESTDIR$BIN" status --config "$DESTDIR$CONF"
fi
if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: nothing was changed"
else
    echo "storelink-agent installed: $BIN, config $CONF, unit $UNIT"
fi
