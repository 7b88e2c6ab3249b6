#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this host (munged + slurmctld + slurmd) for the Slurm tests.
#
# Idempotent: installs slurm-wlm and munge when missing, (re)writes /etc/slurm/slurm.conf for this
# host and its CPUs, starts whatever daemon is not running, and waits until `sinfo` shows the node
# usable. Meant for CI containers and dev boxes: no systemd, no cgroups (proctrack/linuxproc),
# no accounting database (finished jobs stay visible to `scontrol show job` for MinJobAge).
#
# Exit codes: 0 cluster up; 3 Slurm cannot be installed here (not root, no apt-get): tests skip;
# 1 anything else (install, config or daemon failure): tests fail, with the log tail printed.
#
# Usage: .ci/slurm_up.sh          (as root)      .ci/slurm_up.sh --down   (stop the daemons)
set -euo pipefail

CONF=/etc/slurm/slurm.conf
LOG_DIR=/var/log/slurm
NODE=$(hostname -s)

say() { echo "slurm_up: $*"; }
die() { echo "slurm_up: error: $*" >&2; exit 1; }

# Stop a daemon started by this script, by the pid in its pid file.
stop() {
    local pidfile=$1 pid
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ ${1-} == --down ]]; then
    stop /run/slurmd.pid; stop /run/slurmctld.pid; stop /run/munge/munged.pid
    say "stopped"; exit 0
fi

# --- install -------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        echo "slurm_up: cannot install Slurm here (needs root and apt-get; uid=$(id -u))" >&2
        exit 3
    fi
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || die "apt-get install failed"
fi
[[ $(id -u) == 0 ]] || { echo "slurm_up: starting the Slurm daemons needs root" >&2; exit 3; }

# --- munge ---------------------------------------------------------------------------------------
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if ! running /run/munge/munged.pid; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || die "munge does not round-trip a credential"

# --- slurm.conf ----------------------------------------------------------------------------------
# `slurmd -C` prints this host's NodeName line (CPUs, sockets, cores, threads, RealMemory).
node_line=$(slurmd -C | head -n1)
[[ $node_line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
install -d -m 0755 /etc/slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
new_conf=$(cat <<EOF
# Written by .ci/slurm_up.sh: a one-node cluster on $NODE for tests. Do not use in production.
ClusterName=smolds-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# Containers have no usable cgroups: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# No accounting database: keep finished jobs in 'scontrol show job' for an hour.
MinJobAge=3600
$node_line State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
if [[ ! -f $CONF ]] || [[ $(cat "$CONF") != "$new_conf" ]]; then
    say "writing $CONF ($node_line)"
    printf '%s\n' "$new_conf" > "$CONF"
    # A changed config needs fresh daemons (slurmd re-registers its hardware on start).
    stop /run/slurmd.pid; stop /run/slurmctld.pid
fi

# --- daemons -------------------------------------------------------------------------------------
if ! running /run/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld || die "slurmctld failed to start; tail of $LOG_DIR/slurmctld.log:
$(tail -n 20 $LOG_DIR/slurmctld.log 2>/dev/null)"
fi
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping | grep -q UP || die "slurmctld does not answer 'scontrol ping'; tail of $LOG_DIR/slurmctld.log:
$(tail -n 20 $LOG_DIR/slurmctld.log 2>/dev/null)"
if ! running /run/slurmd.pid; then
    say "starting slurmd"
    slurmd || die "slurmd failed to start; tail of $LOG_DIR/slurmd.log:
$(tail -n 20 $LOG_DIR/slurmd.log 2>/dev/null)"
fi

# --- wait for the node ---------------------------------------------------------------------------
state=""
for _ in $(seq 150); do
    state=$(sinfo --noheader --nodes "$NODE" --format %T 2>/dev/null | head -n1)
    case $state in
        idle|mixed|allocated|completing) say "node $NODE is $state"; exit 0 ;;
        down*|drain*|drained*|fail*)
            # Left down by an earlier run (e.g. the daemon was killed): bring it back once.
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
die "node $NODE not usable after 30 s (state '${state:-none}'); tail of $LOG_DIR/slurmd.log:
$(tail -n 20 $LOG_DIR/slurmd.log 2>/dev/null)"
