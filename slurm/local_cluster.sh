#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, to try the sbatch scripts before a real cluster.
#
#   slurm/local_cluster.sh up [--install]   start munged, slurmctld and slurmd (idempotent)
#   slurm/local_cluster.sh status           sinfo, squeue and the daemons' pids
#   slurm/local_cluster.sh env              the export line the SLURM commands need
#   slurm/local_cluster.sh down             stop the three daemons (by pid) and wait for them
#
#   eval "$(slurm/local_cluster.sh up)"     # up, then SLURM_CONF is set in this shell
#   sbatch --gpus-per-node=0 --cpus-per-task=2 --export=ALL,NPROC=2 slurm/train.sbatch
#
# Needs root and Debian's slurm-wlm + munge (22.05 tested): `up --install` runs
# `apt-get install -y slurm-wlm munge` when slurmctld or munged is missing; nothing else installs.
# Everything lives in SLURM_LOCAL_DIR (default /tmp/sicsrec-slurm): munge key and socket,
# slurm.conf, state and spool directories, logs (log/*.log), pid files. Nothing under /etc or
# /var is used or changed; the client commands find the cluster through SLURM_CONF, which `up`
# and `env` print as an export line on stdout (messages go to stderr) and every job inherits.
# The node: this host (NodeName from `hostname -s`, address 127.0.0.1), CPUs=`nproc`,
# RealMemory from `free -m`, no GPUs (submit with --gpus-per-node=0); one partition `local`.
# No accounting daemon, so sacct has no data: `scontrol show job` shows a finished job (with its
# Restarts count) for MinJobAge=16 s, and log/jobcomp.log keeps one line per finished job.
# (MinJobAge this short also keeps `sbatch --wait` prompt: it polls every 2, 8, 8, ... s instead
# of 2, 8, 32, 32, ... s.)
#
# Environment:
#   SLURM_LOCAL_DIR   where everything lives         (default /tmp/sicsrec-slurm)
#   SLURM_LOCAL_PORT  slurmctld port; slurmd uses the next one (default 6817)
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/sicsrec-slurm}
PORT=${SLURM_LOCAL_PORT:-6817}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
PIDS=(munged slurmctld slurmd)  # $DIR/run/<name>.pid; started in this order, stopped in reverse

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }
pid_of() { cat "$DIR/run/$1.pid" 2>/dev/null || true; }
alive() {  # $1: daemon name; its pid file names a live process of that name (not a reused pid)
    local pid
    pid=$(pid_of "$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}
export_line() { echo "export SLURM_CONF=$CONF"; }

wait_for() {  # $1: seconds, $2: what, then the command that must succeed; on timeout: all down
    local seconds=$1 what=$2 i
    shift 2
    for ((i = 0; i < seconds * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    down_quietly
    die "$what did not come up in ${seconds}s; see $DIR/log/"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    say "installing slurm-wlm and munge with apt-get"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >&2
}

write_config() {
    local node cpus mem
    node=$(hostname -s)
    cpus=$(nproc)
    mem=$(free -m | awk '/^Mem:/ {print $2}')
    cat > "$CONF.tmp" <<EOF
# written by slurm/local_cluster.sh: a one-node cluster on $node
ClusterName=sicsrec-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
ReturnToService=2
MinJobAge=16
KillWait=30
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

up() {
    case "${1:-}" in
        --install) install_packages ;;
        "") ;;
        *) die "unknown option $1 (up takes only --install)" ;;
    esac
    [ "$(id -u)" = 0 ] || die "needs root (slurmd runs jobs as their submitting user)"
    for bin in munged slurmctld slurmd sinfo; do
        command -v "$bin" >/dev/null || die "$bin not found: install Debian's slurm-wlm and munge (or: $0 up --install)"
    done
    if alive munged && alive slurmctld && alive slurmd; then
        say "already up ($(sinfo_line))"
        export_line
        return
    fi
    down_quietly  # a partial cluster (one daemon died): start over
    mkdir -p "$DIR"/{munge,state,spool,run,log}
    chmod 700 "$DIR/munge"
    rm -rf "${DIR:?}"/state/* "${DIR:?}"/spool/*  # a fresh cluster: no jobs recovered from an old one
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$DIR/munge/munge.key"
    write_config
    export SLURM_CONF=$CONF

    munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force \
        || die "munged did not start; see $DIR/log/munged.log"
    wait_for 10 munged munge --socket="$MUNGE_SOCKET" -n
    slurmctld -f "$CONF" || { down_quietly; die "slurmctld did not start; see $DIR/log/slurmctld.log"; }
    wait_for 30 slurmctld scontrol ping
    slurmd -f "$CONF" -N "$(hostname -s)" || { down_quietly; die "slurmd did not start; see $DIR/log/slurmd.log"; }
    wait_for 60 "the node" node_idle
    say "up: $(sinfo_line)"
    export_line
}

node_idle() { sinfo -h -N -o %T | grep -Eq '^(idle|mixed|allocated)'; }
sinfo_line() { SLURM_CONF=$CONF sinfo -h -o '%P %D node(s) %T, %c CPU(s)' 2>/dev/null | head -n 1; }

stop() {  # $1: daemon name; SIGTERM, then SIGKILL after 20 s
    local pid i
    pid=$(pid_of "$1")
    if alive "$1"; then
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$1 ($pid) did not stop on SIGTERM: SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
        say "stopped $1 ($pid)"
    fi
    rm -f "$DIR/run/$1.pid"
}

down_quietly() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[i]}"; done
}

down() {
    # Jobs first: their slurmstepd and job processes outlive slurmd by design.
    local i pid jobs
    if alive slurmctld; then
        jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            say "cancelling job(s) $jobs"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel --full --signal=KILL $jobs 2>/dev/null || true
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 150; i++)); do  # up to 30 s for the steps to end (none without slurmd)
                alive slurmd || break
                [ -z "$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    down_quietly
    # Whatever of this cluster's jobs is still left (slurmd gone before its steps ended): the
    # slurmstepd processes and job processes started with this cluster's SLURM_CONF.
    for pid in $(leftover_pids); do
        say "killing leftover process $pid: $({ tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | cut -c1-80)"
        kill -9 "$pid" 2>/dev/null || true
    done
    say "down (logs kept in $DIR/log)"
}

leftover_pids() {  # slurmstepd, or a process of a job (SLURM_JOB_ID set), started with SLURM_CONF=$CONF
    local proc pid ancestors=" " p=$$ env
    while [ "$p" -gt 1 ] 2>/dev/null; do  # never this script or a shell it runs in
        ancestors+="$p "
        p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    done
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        [[ "$ancestors" == *" $pid "* ]] && continue
        env=$({ tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null) || continue
        grep -qx "SLURM_CONF=$CONF" <<< "$env" || continue
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] || grep -q '^SLURM_JOB_ID=' <<< "$env"; then
            echo "$pid"
        fi
    done
}

status() {
    local name
    for name in "${PIDS[@]}"; do
        if alive "$name"; then say "$name running (pid $(pid_of "$name"))"; else say "$name not running"; fi
    done
    if alive slurmctld; then
        SLURM_CONF=$CONF sinfo
        SLURM_CONF=$CONF squeue
    else
        return 1
    fi
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down ;;
    status) status ;;
    env) export_line ;;
    *) echo "usage: $0 up [--install] | down | status | env" >&2; exit 2 ;;
esac
