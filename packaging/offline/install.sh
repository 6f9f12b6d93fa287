#!/bin/sh
# gatewayd offline install: for a host with Python 3.11 or 3.12 (and its venv module) but no network.
#   sudo ./install.sh                 # /opt/gatewayd/venv, /opt/gatewayd/bin/gatewayd, units, /etc/gatewayd
#   ./install.sh --venv DIR           # only a virtual environment at DIR (no root needed; nothing else touched)
# PYTHON=/usr/bin/python3.12 ./install.sh picks the interpreter. Every package comes from wheels/ next to this
# script (pip --no-index): nothing is fetched. See docs/install.md.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
venv=/opt/gatewayd/venv
only_venv=
case "${1:-}" in
  --venv) venv=${2:?--venv DIR}; only_venv=1 ;;
  "") ;;
  *) echo "usage: $0 [--venv DIR]" >&2; exit 2 ;;
esac
if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; then
  echo "install.sh: $PYTHON is not Python 3.11 or 3.12 (the wheels here are for those): set PYTHON=..." >&2
  exit 1
fi
# Only wheels/ counts: no pip configuration or PIP_* variable of this host may add an index or a folder.
for v in $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/\1/p'); do unset "$v"; done
export PIP_CONFIG_FILE=/dev/null
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-index --find-links "$here/wheels" --only-binary=:all: \
  --disable-pip-version-check "gatewayd[postgresql,mysql,webservice]==$(cat "$here/VERSION")"  # dist.py's EXTRAS
"$venv/bin/gatewayd" --version
[ -n "$only_venv" ] && exit 0

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (or use --venv DIR)" >&2; exit 1; }
mkdir -p /opt/gatewayd/bin
ln -sfn ../venv/bin/gatewayd /opt/gatewayd/bin/gatewayd
getent group gatewayd >/dev/null || groupadd --system gatewayd
getent passwd gatewayd >/dev/null || useradd --system --gid gatewayd --home-dir /var/lib/gatewayd \
  --no-create-home --shell /sbin/nologin gatewayd
for g in inner outer; do
  getent group "gatewayd-$g" >/dev/null || groupadd --system "gatewayd-$g"
  getent passwd "gatewayd-$g" >/dev/null || useradd --system --gid "gatewayd-$g" --groups gatewayd \
    --home-dir /nonexistent --no-create-home --shell /sbin/nologin "gatewayd-$g"
done
install -d -o root -g gatewayd -m 2770 /var/lib/gatewayd
install -d -o gatewayd -g gatewayd -m 0700 /var/lib/gatewayd/backup  # gatewayd-backup.timer's copies
install -d -o root -g gatewayd -m 0750 /etc/gatewayd
if [ ! -e /etc/gatewayd/gateway.yaml ]; then
  sed 's#^  path: chamber.sqlite3 #  path: /var/lib/gatewayd/chamber.sqlite3 #' "$here/config/gateway.example.yaml" \
    > /etc/gatewayd/gateway.yaml
fi
units=/etc/systemd/system
cp "$here"/deploy/systemd/*.service "$here"/deploy/systemd/*.timer "$units/"
[ -d /etc/tmpfiles.d ] && cp "$here/deploy/systemd/gatewayd.tmpfiles" /etc/tmpfiles.d/gatewayd.conf
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
echo "gatewayd installed; next: certificates and /etc/gatewayd/gateway.yaml, then" \
     "'gatewayd check-config /etc/gatewayd/gateway.yaml' and 'systemctl enable --now gatewayd' (docs/install.md)"
