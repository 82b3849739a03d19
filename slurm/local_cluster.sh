#!/usr/bin/env bash
# A real SLURM cluster on this machine, to try the sbatch scripts before a real cluster.
#
#   slurm/local_cluster.sh up [--install] [--nodes N]   start munged, slurmctld, slurmd(s) (idempotent)
#   slurm/local_cluster.sh status                       daemons' pids, sinfo, squeue
#   slurm/local_cluster.sh exec CMD...                  run a SLURM command against the cluster
#   slurm/local_cluster.sh env                          the export line the SLURM commands need
#   slurm/local_cluster.sh down                         cancel the jobs, stop the daemons (by pid)
#
#   eval "$(slurm/local_cluster.sh up)"     # one node; SLURM_CONF is now set in this shell
#   sbatch --gpus-per-node=0 --cpus-per-task=2 --export=ALL,NPROC=2 slurm/train.sbatch
#
#   slurm/local_cluster.sh up --nodes 2     # two nodes, each its own network namespace
#   slurm/local_cluster.sh exec sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=2 slurm/train.sbatch
#
# Needs root and Debian's slurm-wlm + munge (22.05 tested): `up --install` runs
# `apt-get install -y slurm-wlm munge` when slurmctld, slurmd or munged is missing; nothing else
# installs. Everything lives in SLURM_LOCAL_DIR (default /tmp/sicsrec-slurm): munge key and
# socket, slurm.conf, state and spool directories, logs (log/*.log), pid files. Nothing under
# /etc or /var is used or changed; the client commands find the cluster through SLURM_CONF, which
# `up` and `env` print as an export line on stdout (messages go to stderr) and every job inherits.
#
# One node (the default): this host (NodeName from `hostname -s`, address 127.0.0.1).
# N nodes: node1..nodeN, each slurmd in its own network, mount and UTS namespace: hostname
# nodeI, address 10.217.K.I on a bridge in one more namespace (K from SLURM_LOCAL_DIR), and
# /etc/hosts replaced, inside those namespaces only, by $DIR/hosts naming all nodes. The
# namespaces reach nothing but each other: jobs talk between "hosts" over real addresses (torch
# rendezvous, gloo, Ray) and cannot reach this machine's network. slurmctld runs on node1, which
# is also the login node: SLURM commands must run inside its namespaces, `exec` does that
# (with one node, `exec` only sets SLURM_CONF). munged serves all nodes through its socket file.
# Every node: CPUs=`nproc`, RealMemory from `free -m` (divided by N), no GPUs (submit with
# --gpus-per-node=0); one partition `local`.
# No accounting daemon, so sacct has no data: `scontrol show job` shows a finished job (with its
# Restarts count) for MinJobAge=16 s, and log/jobcomp.log keeps one line per finished job.
# (MinJobAge this short also keeps `sbatch --wait` prompt: it polls every 2, 8, 8, ... s instead
# of 2, 8, 32, 32, ... s.)
#
# Environment:
#   SLURM_LOCAL_DIR    where everything lives         (default /tmp/sicsrec-slurm)
#   SLURM_LOCAL_PORT   slurmctld port; slurmd uses the next one (default 6817)
#   SLURM_LOCAL_NODES  number of nodes for `up`       (default 1; --nodes wins)
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/sicsrec-slurm}
PORT=${SLURM_LOCAL_PORT:-6817}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
TAG=$(printf %s "$DIR" | md5sum | cut -c1-6)
NS=slr$TAG                             # namespaces $NS-sw (the bridge), $NS-n1 .. $NS-nN
NET=10.217.$(( 0x$TAG % 250 + 1 ))     # the nodes' /24
NODES=1                                # set by up, or read from $DIR/cluster.env
NODE_NAMES=()

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

load_layout() {  # the node count `up` wrote, and the node names
    if [ -f "$DIR/cluster.env" ]; then
        # shellcheck disable=SC1091
        source "$DIR/cluster.env"
    fi
    set_node_names
}

set_node_names() {
    if [ "$NODES" -gt 1 ]; then
        mapfile -t NODE_NAMES < <(seq -f "node%g" "$NODES")
    else
        NODE_NAMES=("$(hostname -s)")
    fi
}

pid_of() { cat "$DIR/run/$1.pid" 2>/dev/null || true; }
alive() {  # $1: pid file name, $2: process name (default $1): a live process of that name
    local pid
    pid=$(pid_of "$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${2:-$1}" ]
}
all_alive() {
    local node
    alive munged && alive slurmctld || return 1
    for node in "${NODE_NAMES[@]}"; do alive "slurmd-$node" slurmd || return 1; done
}
export_line() { echo "export SLURM_CONF=$CONF"; }

client() {  # a SLURM command against this cluster: in node1's namespaces when there are several
    if [ "$NODES" -gt 1 ]; then
        local pid
        pid=$(pid_of slurmctld)
        # (return, not die: wait_for calls this in this shell, with its output thrown away)
        alive slurmctld || { say "slurmctld is not running (yet)"; return 1; }
        nsenter --target "$pid" --net --mount --uts --wd="$PWD" -- env SLURM_CONF="$CONF" "$@"
    else
        env SLURM_CONF="$CONF" "$@"
    fi
}

on_node() {  # $1: node index (multi-node), then a command: run it in that node's namespaces
    local i=$1
    shift
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without /sys/fs/cgroup, and
    # slurmd will not start without it
    # shellcheck disable=SC2016
    nsenter --net="/run/netns/$NS-n$i" unshare --mount --uts --propagation private \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh "$DIR/hosts" "node$i" "$@"
}

wait_for() {  # $1: seconds, $2: what, then the command that must succeed
    local seconds=$1 what=$2 i
    shift 2
    for ((i = 0; i < seconds * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "$what did not come up in ${seconds}s; see $DIR/log/"  # (up's EXIT trap stops the rest)
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
    local cpus mem ctl i
    cpus=$(nproc)
    mem=$(( $(free -m | awk '/^Mem:/ {print $2}') / NODES ))
    if [ "$NODES" -gt 1 ]; then ctl="node1($NET.1)"; else ctl="${NODE_NAMES[0]}(127.0.0.1)"; fi
    {
        echo "# written by slurm/local_cluster.sh: $NODES node(s) on $(hostname -s)"
        cat <<EOF
ClusterName=sicsrec-local
SlurmctldHost=$ctl
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
EOF
        if [ "$NODES" -gt 1 ]; then
            for ((i = 1; i <= NODES; i++)); do
                echo "NodeName=node$i NodeAddr=$NET.$i CPUs=$cpus RealMemory=$mem State=UNKNOWN"
            done
            echo "PartitionName=local Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
        else
            echo "NodeName=${NODE_NAMES[0]} NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
            echo "PartitionName=local Nodes=${NODE_NAMES[0]} Default=YES MaxTime=INFINITE State=UP"
        fi
    } > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
}

make_network() {  # a bridge namespace and one namespace per node, veth-linked; nothing else
    local i
    delete_network
    ip netns add "$NS-sw"
    ip -n "$NS-sw" link add br0 type bridge
    ip -n "$NS-sw" link set br0 up
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost"
    } > "$DIR/hosts"
    for ((i = 1; i <= NODES; i++)); do
        ip netns add "$NS-n$i"
        ip link add name eth0 netns "$NS-n$i" type veth peer name "v$i" netns "$NS-sw"
        ip -n "$NS-sw" link set "v$i" master br0
        ip -n "$NS-sw" link set "v$i" up
        ip -n "$NS-n$i" addr add "$NET.$i/24" dev eth0
        ip -n "$NS-n$i" link set eth0 up
        ip -n "$NS-n$i" link set lo up
        echo "$NET.$i node$i" >> "$DIR/hosts"
    done
}

delete_network() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NS-(sw|n[0-9]+)$" || true); do
        ip netns del "$ns"
    done
}

up() {
    local nodes=${SLURM_LOCAL_NODES:-1} i
    while [ $# -gt 0 ]; do
        case "$1" in
            --install) install_packages ;;
            --nodes) nodes=${2:?--nodes needs a number}; shift ;;
            --nodes=*) nodes=${1#--nodes=} ;;
            *) die "unknown option $1 (up takes --install and --nodes N)" ;;
        esac
        shift
    done
    [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || die "--nodes must be 1..99, got $nodes"
    [ "$(id -u)" = 0 ] || die "needs root (slurmd runs jobs as their submitting user)"
    for bin in munged slurmctld slurmd sinfo nsenter unshare; do
        command -v "$bin" >/dev/null || die "$bin not found: install Debian's slurm-wlm and munge (or: $0 up --install)"
    done
    load_layout
    if all_alive; then
        [ "$NODES" = "$nodes" ] || die "already up with $NODES node(s): run '$0 down' first"
        say "already up ($(sinfo_line))"
        export_line
        return
    fi
    down_quietly  # a partial cluster (one daemon died): start over
    delete_network
    NODES=$nodes
    set_node_names
    trap 'up_failed $?' EXIT
    if [ "$NODES" -gt 1 ]; then
        # exit status 3: this machine cannot do several nodes (tests skip on it)
        command -v ip >/dev/null || { say "error: --nodes $NODES needs ip (Debian's iproute2)"; exit 3; }
        unshare --net true 2>/dev/null || { say "error: cannot create network namespaces here (--nodes $NODES)"; exit 3; }
    fi
    mkdir -p "$DIR"/{munge,state,spool,run,log}
    chmod 700 "$DIR/munge"
    rm -rf "${DIR:?}"/state/* "${DIR:?}"/spool/*  # a fresh cluster: no jobs recovered from an old one
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$DIR/munge/munge.key"
    echo "NODES=$NODES" > "$DIR/cluster.env"
    write_config
    export SLURM_CONF=$CONF

    munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force \
        || die "munged did not start; see $DIR/log/munged.log"
    wait_for 10 munged munge --socket="$MUNGE_SOCKET" -n
    if [ "$NODES" -gt 1 ]; then
        make_network
        on_node 1 slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
        wait_for 30 slurmctld client scontrol ping
        for ((i = 1; i <= NODES; i++)); do
            mkdir -p "$DIR/spool/node$i"
            on_node "$i" slurmd -f "$CONF" -N "node$i" \
                || die "slurmd on node$i did not start; see $DIR/log/slurmd-node$i.log"
        done
    else
        mkdir -p "$DIR/spool/${NODE_NAMES[0]}"
        slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
        wait_for 30 slurmctld client scontrol ping
        slurmd -f "$CONF" -N "${NODE_NAMES[0]}" \
            || die "slurmd did not start; see $DIR/log/slurmd-${NODE_NAMES[0]}.log"
    fi
    wait_for 60 "the node(s)" nodes_idle
    trap - EXIT
    say "up: $(sinfo_line)"
    export_line
}

up_failed() {  # EXIT trap of `up`: whatever stopped it, leave nothing running
    if [ "$1" != 0 ]; then
        say "up failed (status $1): stopping what it started; see $DIR/log/"
        down_quietly
        delete_network
    fi
}

nodes_idle() {  # every node registered and usable
    local states
    states=$(client sinfo -h -N -o %T)
    [ "$(grep -cE '^(idle|mixed|allocated)$' <<< "$states")" = "$NODES" ]
}
sinfo_line() { client sinfo -h -o '%P %D node(s) %T, %c CPU(s) each' 2>/dev/null | head -n 1; }

stop() {  # $1: pid file name, $2: process name; SIGTERM, then SIGKILL after 20 s
    local pid i
    pid=$(pid_of "$1")
    if alive "$1" "${2:-$1}"; then
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

down_quietly() {  # the daemons, in reverse order of their start
    local node
    for node in "${NODE_NAMES[@]}"; do stop "slurmd-$node" slurmd; done
    stop slurmctld
    stop munged
}

down() {
    local i pid jobs
    load_layout
    # Jobs first: their slurmstepd and job processes outlive slurmd by design.
    if alive slurmctld; then
        jobs=$(client squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            say "cancelling job(s) $jobs"
            # shellcheck disable=SC2086
            client scancel --full --signal=KILL $jobs 2>/dev/null || true
            # shellcheck disable=SC2086
            client scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 150; i++)); do  # up to 30 s for the steps to end (none without slurmd)
                all_alive || break
                [ -z "$(client squeue -h -o %A 2>/dev/null)" ] && break
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
    if [ "$NODES" -gt 1 ] || [ -n "$(ip netns list 2>/dev/null | grep -E "^$NS-" || true)" ]; then
        delete_network
    fi
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
    local node
    load_layout
    if alive munged; then say "munged running (pid $(pid_of munged))"; else say "munged not running"; fi
    if alive slurmctld; then say "slurmctld running (pid $(pid_of slurmctld))"; else say "slurmctld not running"; fi
    for node in "${NODE_NAMES[@]}"; do
        if alive "slurmd-$node" slurmd; then
            say "slurmd $node running (pid $(pid_of "slurmd-$node"))"
        else
            say "slurmd $node not running"
        fi
    done
    alive slurmctld || return 1
    client sinfo
    client squeue
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down ;;
    status) status ;;
    env) export_line ;;
    exec) shift; [ $# -gt 0 ] || die "exec needs a command"; load_layout; client "$@" ;;
    *) echo "usage: $0 up [--install] [--nodes N] | down | status | exec CMD... | env" >&2; exit 2 ;;
esac
