#!/bin/bash
# A one-node SLURM cluster on this machine for tests/test_slurm.py: Debian's slurm-wlm daemons
# (slurmctld, slurmd) and a private munged, all with their own configuration, sockets, ports and
# state under one directory, so a machine's own SLURM or munge setup is neither read nor changed.
#
#   bash tests/slurm/setup_local_slurm.sh install  # only install the packages if missing (CI)
#   bash tests/slurm/setup_local_slurm.sh start    # install if missing, start; idempotent
#   bash tests/slurm/setup_local_slurm.sh stop     # stop the daemons this directory started
#   bash tests/slurm/setup_local_slurm.sh status   # exit 0 when the controller answers
#
# Clients find the cluster through SLURM_CONF=$DIR/slurm.conf (the last line `start` prints).
# The node is this host with all its CPUs (nproc) in one partition "debug"; jobs run as the
# caller. Installing the packages (apt-get) and running slurmd need root.
# Environment: MEGATRON_LTD_SLURM_DIR (default /var/tmp/megatron-ltd-slurm),
# MEGATRON_LTD_SLURM_PORT / MEGATRON_LTD_SLURMD_PORT (the daemons' ports, default 16817 / 16818).
# Exit 0 with the cluster up; otherwise one line on stderr saying which step failed and where
# its log is, and a non-zero exit (tests then skip with that line as the reason).
set -euo pipefail

DIR=${MEGATRON_LTD_SLURM_DIR:-/var/tmp/megatron-ltd-slurm}
PORT=${MEGATRON_LTD_SLURM_PORT:-16817}
SLURMD_PORT=${MEGATRON_LTD_SLURMD_PORT:-$((PORT + 1))}
CONF=$DIR/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)
export SLURM_CONF=$CONF

fail() {
    echo "setup_local_slurm.sh: $*" >&2
    exit 1
}

# install: the Debian packages, unless their programs are already there. The packages' own
# services are not started here (a container has no init to start them; we run our own).
install() {
    local missing=() prog
    for prog in slurmctld slurmd sbatch munged; do
        command -v "$prog" >/dev/null || missing+=("$prog")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] ||
        fail "${missing[*]} not installed and not root: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || fail "${missing[*]} not installed and no apt-get here"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
               "${PACKAGES[@]}" || { apt-get update &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
               "${PACKAGES[@]}"; }; } > "$DIR/apt.log" 2>&1; then
        fail "apt-get install ${PACKAGES[*]} failed (log: $DIR/apt.log)"
    fi
}

# alive PIDFILE: the process named in PIDFILE runs.
alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) && [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

# write_config: munge key and slurm.conf (rewritten each start: the CPU count may change).
write_config() {
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log"
    chmod 700 "$DIR/munge"
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    cat > "$CONF.tmp" <<CONF
# Written by tests/slurm/setup_local_slurm.sh: one node ($host, $cpus CPUs), no accounting.
ClusterName=megatronltd
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job may start again this many seconds after its requeue (default 120).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
# sched_interval: look at pending jobs every 2 s (a requeued job waits for this scan).
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    mv "$CONF.tmp" "$CONF"
}

# wait_for WHAT SECONDS COMMAND...: retry COMMAND once a second until it succeeds.
wait_for() {
    local what=$1 seconds=$2 i
    shift 2
    for ((i = 0; i < seconds; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    fail "$what did not come up in ${seconds} s (logs: $DIR/log)"
}

node_idle() {
    sinfo -h -n "$(hostname -s)" -o %t | grep -qE '^(idle|mix|alloc)'
}

start() {
    mkdir -p "$DIR"
    install
    [[ $(id -u) -eq 0 ]] || fail "slurmd must run as root (it starts each job as its user)"
    write_config
    if ! alive "$DIR/munged.pid"; then
        munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
               --pid-file="$DIR/munged.pid" --seed-file="$DIR/munge/munged.seed" \
               --log-file="$DIR/log/munged.log" \
            || fail "munged did not start (log: $DIR/log/munged.log)"
    fi
    wait_for munged 10 munge --socket="$DIR/munge/munge.socket" -n
    if ! alive "$DIR/slurmctld.pid"; then
        slurmctld -f "$CONF" || fail "slurmctld did not start (log: $DIR/log/slurmctld.log)"
    fi
    wait_for slurmctld 30 scontrol ping
    if ! alive "$DIR/slurmd.pid"; then
        slurmd -f "$CONF" || fail "slurmd did not start (log: $DIR/log/slurmd.log)"
    fi
    wait_for "the node $(hostname -s)" 30 node_idle
    echo "SLURM_CONF=$CONF"
}

stop() {
    local name
    for name in slurmd slurmctld munged; do
        if alive "$DIR/$name.pid"; then
            kill "$(cat "$DIR/$name.pid")"
            for _ in $(seq 20); do alive "$DIR/$name.pid" || break; sleep 0.5; done
        fi
    done
}

case "${1:-start}" in
    install) mkdir -p "$DIR"; install ;;
    start) start ;;
    stop) stop ;;
    status) scontrol ping >/dev/null 2>&1 ;;
    *) fail "unknown command '$1' (expected install, start, stop or status)" ;;
esac
