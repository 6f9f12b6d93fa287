# Shared by gatewayd's maintainer scripts (copied into each one when the .deb is built).
# The gates, their units, their configs and the users they run as.
GW=/opt/gatewayd
RB=$GW/rollback
UNITS="gatewayd.service gatewayd-inner.service gatewayd-outer.service gatewayd-backup.timer"
have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }
# gate NAME -> the unit's user
gate_user() { case "$1" in gateway) echo gatewayd ;; *) echo "gatewayd-$1" ;; esac; }
as_gate() { user=$(gate_user "$1"); shift; runuser -u "$user" -- "$@"; }
start_units() { # the units listed in $RB/active
  [ -f "$RB/active" ] && have_systemd || return 0
  for u in $(cat "$RB/active"); do systemctl start "$u" || return 1; done
}
