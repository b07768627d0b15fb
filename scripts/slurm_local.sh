#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm tests and for trying `malign study submit`
# without a cluster: munge + slurmctld + slurmd + slurmdbd with MariaDB (so sacct works).
#
#   scripts/slurm_local.sh start    install (apt-get, first time only) and start; fast when already up
#   scripts/slurm_local.sh stop     stop the daemons this script started
#   scripts/slurm_local.sh status   exit 0 when the cluster answers and the node is usable
#
# Machines without systemd (containers, CI) are the target: daemons are started directly, detached
# with setsid and with every inherited file descriptor closed, otherwise they keep the caller's
# output pipe open and CI never sees EOF. Needs root (apt-get, daemons, /etc/slurm).
set -euo pipefail

STATE=${MALIGN_SLURM_STATE:-/var/lib/malign-slurm}
CONF_DIR=/etc/slurm
CLUSTER=malign
PARTITION=${MALIGN_SLURM_PARTITION:-debug}
HOST=$(hostname -s)
LOG=$STATE/log
DB_SOCK=/run/mysqld/mysqld.sock
DB_PASS=malign-local-slurm   # a local throwaway accounting database reachable only through its socket
MARK="# written by megatron-align scripts/slurm_local.sh"
PKGS=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)

say() { echo "slurm_local: $*" >&2; }

# Start "$@" detached: own session, stdin from /dev/null, output to a log, no inherited fds above 2.
detach() {
  local name=$1; shift
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec setsid -f "$@" </dev/null >>"$LOG/$name.out" 2>&1
  )
}

need_root() {
  if [ "$(id -u)" != 0 ]; then say "must run as root (installs packages and starts daemons)"; exit 1; fi
}

install_pkgs() {
  local missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { say "no apt-get and packages missing: ${missing[*]}"; exit 1; }
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The lock keeps parallel installers on one machine from racing on dpkg.
  flock /tmp/apt.lock apt-get update -q >/dev/null
  flock /tmp/apt.lock apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

real_mem_mb() { awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo; }

write_conf() {
  # RealMemory must stay below the real memory or slurmd registers "low memory" and the node drains.
  local mem=$(( $(real_mem_mb) * 3 / 4 ))
  [ "$mem" -gt 16000 ] && mem=16000
  # CPUs above the core count (config_overrides) so a few small test jobs can run side by side.
  local cpus=${MALIGN_SLURM_CPUS:-8}
  local new
  new=$(cat <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups here: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
# Dependents of a failed job are cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
  local dbd
  dbd=$(cat <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
  mkdir -p "$CONF_DIR"
  if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
    say "$CONF_DIR/slurm.conf exists and was not written by this script; leaving it alone"
    exit 1
  fi
  CHANGED=0
  if [ "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" != "$new" ]; then
    printf '%s\n' "$new" > "$CONF_DIR/slurm.conf"; CHANGED=1
  fi
  if [ "$(cat "$CONF_DIR/slurmdbd.conf" 2>/dev/null)" != "$dbd" ]; then
    printf '%s\n' "$dbd" > "$CONF_DIR/slurmdbd.conf"; CHANGED=1
  fi
  chmod 600 "$CONF_DIR/slurmdbd.conf"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local n=$(( $1 * 5 )) what=$2; shift 2
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  say "timed out waiting for $what (logs in $LOG)"; return 1
}

start_munge() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null;
                                   chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    detach munged runuser -u munge -- /usr/sbin/munged --force
    wait_for 10 munged sh -c 'munge -n </dev/null | unmunge'
  fi
}

start_db() {
  if ! mysqladmin --socket="$DB_SOCK" ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if [ ! -d /var/lib/mysql/mysql ]; then
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOG/mariadb-install.out" 2>&1
    fi
    detach mariadbd /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$DB_SOCK" \
      --skip-networking --pid-file=/run/mysqld/mysqld.pid
    wait_for 60 MariaDB mysqladmin --socket="$DB_SOCK" ping
  fi
  mysql --socket="$DB_SOCK" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

node_usable() { sinfo -h -N -o '%t' 2>/dev/null | grep -qvE 'down|drain|fail|unk|^$'; }

cluster_ok() {
  scontrol ping 2>/dev/null | grep -q UP && node_usable && sacct -n -X -S now-1minute >/dev/null 2>&1
}

start() {
  need_root
  mkdir -p "$STATE" "$LOG"
  install_pkgs
  write_conf
  if [ "$CHANGED" = 0 ] && cluster_ok; then say "already running"; return 0; fi
  [ "$CHANGED" = 1 ] && stop_daemons
  mkdir -p "$STATE/ctld" "$STATE/slurmd"
  start_munge
  start_db
  if ! alive "$STATE/slurmdbd.pid"; then
    detach slurmdbd /usr/sbin/slurmdbd
    wait_for 30 slurmdbd sacctmgr -n show cluster
  fi
  sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
  if ! alive "$STATE/slurmctld.pid"; then
    detach slurmctld /usr/sbin/slurmctld -i
    wait_for 30 slurmctld sh -c 'scontrol ping | grep -q UP'
  fi
  if ! alive "$STATE/slurmd.pid"; then
    detach slurmd /usr/sbin/slurmd
  fi
  wait_for 30 "the node to register" sh -c "sinfo -h -N -o '%t' | grep -qv unk"
  if ! node_usable; then
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  fi
  wait_for 30 "a usable node" node_usable
  wait_for 30 "sacct" sacct -n -X -S now-1minute
  say "running: partition $PARTITION on $HOST (logs in $LOG)"
}

stop_daemons() {
  local p
  for d in slurmd slurmctld slurmdbd; do
    p=$STATE/$d.pid
    if alive "$p"; then kill "$(cat "$p")" 2>/dev/null || true; fi
  done
  for d in slurmd slurmctld slurmdbd; do
    p=$STATE/$d.pid
    for _ in $(seq 50); do alive "$p" || break; sleep 0.1; done
  done
}

stop() {
  need_root
  stop_daemons
  if [ -f /run/mysqld/mysqld.pid ]; then mysqladmin --socket="$DB_SOCK" shutdown 2>/dev/null || true; fi
  say "stopped slurm daemons and MariaDB (munged left running: other tools may use it)"
}

status() {
  if cluster_ok; then
    sinfo -N -o '%N %P %t %c %m'
    say "up"
  else
    say "not running (or not usable)"; return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
