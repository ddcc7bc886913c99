#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for genlab's `slurm` tests and for trying a sweep
# before a real cluster: Debian's munge + slurm-wlm, started as root.
#
#   bash scripts/slurm_local.sh up      # install (if missing, needs root and apt), start, wait until the node is idle
#   bash scripts/slurm_local.sh status  # sinfo
#   bash scripts/slurm_local.sh down    # stop the daemons (the packages stay)
#
# No accounting database (as on many small clusters): `sacct` fails, and genlab's tests must not
# need it. SLURM holds a requeued job for a while before it may start again (Reason=BeginTime,
# about two minutes here even with cred_expire=10); tests/test_slurm.py releases such jobs at once
# with `scontrol update jobid=J StartTime=now`.
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/lib/genlab-slurm}
CONF=/etc/slurm/slurm.conf

say() { echo "slurm_local: $*" >&2; }

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "slurm-wlm and munge are not installed, and installing them needs root and apt-get."; return 1
  fi
  say "installing munge and slurm-wlm (about a minute)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q munge slurm-wlm; } >/dev/null 2>&1 \
    || { say "apt-get install munge slurm-wlm failed (no package mirror?)."; return 1; }
}

write_config() {
  local host cpus mem
  host=$(hostname -s); cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MiB, leaving 1 GiB to the system
  mkdir -p /etc/slurm "$STATE"/{ctld,d} /var/log/slurm /run/munge
  cat > "$CONF" <<EOF
ClusterName=genlab-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobRequeue=1
KillWait=10
MinJobAge=600
SchedulerParameters=defer_batch=0
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  chown munge:munge /run/munge 2>/dev/null || true
  pgrep -x munged >/dev/null || sudo_munge
}

sudo_munge() {
  if command -v runuser >/dev/null; then runuser -u munge -- /usr/sbin/munged; else /usr/sbin/munged --force; fi
}

up() {
  install_packages
  write_config
  start_munge
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      say "up: $(sinfo -h -o '%P %D %T %c CPUs')"; return 0
    fi
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  say "the node did not become idle in 60 s; see /var/log/slurm/slurmctld.log and slurmd.log."; return 1
}

down() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  say "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
