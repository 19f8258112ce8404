# shellcheck shell=bash
# Sourced by ceph-up and ceph-down (not run on its own): where a local cluster's
# files live, and how to find, check and stop its daemons.
#
# A daemon is "ours" when its process is alive (a zombie is dead: an
# unreaped child of a container's init keeps its pid but does nothing) and
# its command line is exactly how ceph-up starts it: `ceph-TYPE --conf CONF -i ID`.
# That guards against a pid file naming a pid the kernel has since reused.

# in start order; stop in the reverse order (the mon last, so that the OSD can
# tell it that it is going down and unmount its store cleanly)
CEPH_DAEMONS=(mon.a osd.0 mgr.x)

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die() {
  printf '[%s] error: %s\n' "$PROG" "$1" >&2
  shift
  local line
  for line in "$@"; do printf '  %s\n' "$line" >&2; done
  exit 1
}

# set_paths DIR: DIR (absolute, symlinks resolved), CONF, RUN, LOGS
set_paths() {
  DIR=$(cd -- "$1" && pwd -P)
  CONF=$DIR/ceph.conf
  RUN=$DIR/run
  LOGS=$DIR/log
}

# pid_alive PID: the process exists and is not a zombie
pid_alive() {
  local stat
  [[ $1 =~ ^[0-9]+$ ]] || return 1
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  stat=${stat##*) }  # the command name (field 2) may hold spaces; the state follows ") "
  [ "${stat%% *}" != Z ] && [ "${stat%% *}" != X ]
}

# is_ours PID NAME: PID is alive and runs daemon NAME (TYPE.ID) of this cluster
is_ours() {
  local pid=$1 type=${2%%.*} id=${2#*.} args=()
  pid_alive "$pid" || return 1
  mapfile -d '' -t args 2>/dev/null <"/proc/$pid/cmdline" || return 1
  [ "${#args[@]}" -ge 5 ] || return 1
  [ "${args[0]##*/}" = "ceph-$type" ] && [ "${args[1]}" = --conf ] && [ "${args[2]}" = "$CONF" ] \
    && [ "${args[3]}" = -i ] && [ "${args[4]}" = "$id" ]
}

# find_daemon NAME: print the pid of this cluster's live daemon NAME, or fail.
# The pid file first; failing that (removed, or never written because the
# daemon died early) the processes named ceph-TYPE, checked by command line.
find_daemon() {
  local name=$1 pid comm
  if [ -s "$RUN/$name.pid" ] && read -r pid <"$RUN/$name.pid" && is_ours "$pid" "$name"; then
    echo "$pid"
    return 0
  fi
  for comm in /proc/[0-9]*/comm; do
    read -r pid 2>/dev/null <"$comm" || continue
    [ "$pid" = "ceph-${name%%.*}" ] || continue
    pid=${comm#/proc/}
    pid=${pid%/comm}
    if is_ours "$pid" "$name"; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

# stop_daemons GRACE NAME...: SIGTERM the named daemons that run, all at once;
# wait up to GRACE seconds for them to exit, then SIGKILL what is left.
stop_daemons() {
  local grace=$1 name pid deadline left note
  shift
  local -A pids=()
  for name in "$@"; do
    if pid=$(find_daemon "$name"); then
      kill -TERM "$pid" 2>/dev/null && pids[$name]=$pid
    fi
    # a pid file naming no live daemon of ours is stale
    [ -n "${pids[$name]:-}" ] || rm -f -- "$RUN/$name.pid"
  done
  [ "${#pids[@]}" -gt 0 ] || return 0
  deadline=$((SECONDS + grace))
  while :; do
    left=()
    for name in "${!pids[@]}"; do
      is_ours "${pids[$name]}" "$name" && left+=("$name")
    done
    [ "${#left[@]}" -gt 0 ] && [ "$SECONDS" -lt "$deadline" ] || break
    sleep 0.1
  done
  for name in "${left[@]}"; do
    note=
    [ "$name" != osd.0 ] || note=" (it loses what was written since its last clean stop)"
    log "warning: $name (pid ${pids[$name]}) still runs ${grace}s after SIGTERM: sending SIGKILL$note"
    kill -KILL "${pids[$name]}" 2>/dev/null || true
  done
  for name in "${left[@]}"; do
    for _ in $(seq 50); do is_ours "${pids[$name]}" "$name" || break; sleep 0.1; done
  done
  for name in "${!pids[@]}"; do
    if is_ours "${pids[$name]}" "$name"; then
      log "warning: $name (pid ${pids[$name]}) survived SIGKILL"
    else
      log "stopped $name (pid ${pids[$name]})"
      rm -f -- "$RUN/$name.pid"
      # on SIGTERM, the daemon saved its state (ceph-up recovers one that did not)
      [[ " ${left[*]} " == *" $name "* ]] || rm -f -- "$RUN/$name.started"
    fi
  done
}

# take_lock: one ceph-up or ceph-down at a time per DIR. Fd 9 holds the lock;
# close it (9>&-) for every daemon started, or the daemon would hold it forever.
take_lock() {
  exec 9>>"$DIR/.lock"
  flock -w "${CEPH_LOCK_TIMEOUT:-300}" 9 \
    || die "another ceph-up or ceph-down is working on $DIR (lock $DIR/.lock)" \
      "wait for it to finish; CEPH_LOCK_TIMEOUT sets how long to wait (seconds)"
}
