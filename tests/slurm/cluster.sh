#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for epdctl's tests and for trying `launcher: slurm`.
#
#   eval "$(bash tests/slurm/cluster.sh up)"    # prints only `export ...` lines on stdout
#   bash tests/slurm/cluster.sh status
#   bash tests/slurm/cluster.sh down
#
# munged, slurmctld and two slurmd nodes (n1, n2). Each slurmd runs in a network namespace of its
# own with an address of its own on a private bridge (10.77.0.0/24 by default): the tests' own
# hosts, never an address outside this machine. Needs root, Debian's slurm-wlm and munge.
# Idempotent: `up` on a running cluster prints the same exports; `down` stops each daemon by the
# pid it recorded (never by name) and removes the namespaces, the veths and the bridge.
# Everything lives in $EPDCTL_SLURM_DIR (default /tmp/epdctl-slurm); a munge key and socket of
# its own, so a munged of the system is left alone.
set -euo pipefail

dir="${EPDCTL_SLURM_DIR:-/tmp/epdctl-slurm}"
net="${EPDCTL_SLURM_NET:-10.77.0}"
bridge="${EPDCTL_SLURM_BRIDGE:-epdsl0}"
ctld_port="${EPDCTL_SLURM_PORT:-16817}"
nodes=(n1 n2)
conf="$dir/slurm.conf"

say() { echo "cluster.sh: $*" >&2; }
die() { say "$*"; exit 1; }

addr_of() { # n1 -> 10.77.0.11
    echo "$net.$((10 + ${1#n}))"
}

alive() { # alive PIDFILE: the pid in it runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

exports() {
    echo "export SLURM_CONF=$conf"
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local until=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$until" ] || die "timed out waiting for $what (logs in $dir)"
        sleep 0.2
    done
}

write_conf() {
    local host
    host=$(hostname -s)
    cat >"$conf" <<CONF
# Written by tests/slurm/cluster.sh: a two-node test cluster on one machine.
ClusterName=epdctl
SlurmctldHost=$host($net.1)
SlurmctldPort=$ctld_port
SlurmdPort=$((ctld_port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdTimeout=30
KillWait=5
InactiveLimit=0
MinJobAge=5
CONF
    for n in "${nodes[@]}"; do
        echo "NodeName=$n NodeAddr=$(addr_of "$n") NodeHostname=$n CPUs=2 RealMemory=2000 State=UNKNOWN" >>"$conf"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8" >>"$conf"
}

net_up() {
    if ! ip link show "$bridge" >/dev/null 2>&1; then
        ip link add "$bridge" type bridge
        ip addr add "$net.1/24" dev "$bridge"
    fi
    ip link set "$bridge" up
    for n in "${nodes[@]}"; do
        local ns="epdctl-$n"
        [ -e "/run/netns/$ns" ] || ip netns add "$ns"
        if ! ip link show "veth-$n" >/dev/null 2>&1; then
            ip link add "veth-$n" type veth peer name eth0 netns "$ns"
            ip link set "veth-$n" master "$bridge" up
            ip -n "$ns" addr add "$(addr_of "$n")/24" dev eth0
        fi
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route replace default via "$net.1" 2>/dev/null || true
    done
}

munge_up() {
    mkdir -p "$dir/munge"
    chmod 0700 "$dir/munge"
    if [ ! -s "$dir/munge/munge.key" ]; then
        (umask 077; dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none)
    fi
    alive "$dir/munge/munged.pid" && return
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" </dev/null >>"$dir/munge/munged.start.log" 2>&1
    wait_for 10 munged alive "$dir/munge/munged.pid"
}

ctld_up() {
    alive "$dir/slurmctld.pid" && return
    SLURM_CONF="$conf" setsid slurmctld -f "$conf" -i </dev/null >>"$dir/slurmctld.start.log" 2>&1
    wait_for 20 slurmctld env SLURM_CONF="$conf" scontrol ping
}

slurmd_up() {
    local n=$1
    alive "$dir/slurmd.$n.pid" && return
    mkdir -p "$dir/spool/$n"
    # nsenter --net, not `ip netns exec`: that remounts /sys, and slurmd then finds no cgroup
    # file system. unshare --uts gives the node its own host name.
    SLURM_CONF="$conf" setsid nsenter --net="/run/netns/epdctl-$n" \
        unshare --uts sh -c 'hostname "$1" && exec slurmd -f "$2" -N "$1"' sh "$n" "$conf" \
        </dev/null >>"$dir/slurmd.$n.start.log" 2>&1
    wait_for 20 "slurmd on $n" alive "$dir/slurmd.$n.pid"
}

nodes_idle() {
    local states
    states=$(SLURM_CONF="$conf" sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    for n in "${nodes[@]}"; do
        grep -qE "^$n (idle|mix|alloc)" <<<"$states" || return 1
    done
}

up() {
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, munged and slurmd as root)"
    for cmd in munged slurmctld slurmd srun scontrol nsenter unshare ip; do
        command -v "$cmd" >/dev/null || die "$cmd not found (apt-get install -y slurm-wlm munge iproute2)"
    done
    mkdir -p "$dir/ctld" "$dir/spool"
    chmod 0755 "$dir"
    [ -f "$conf" ] || write_conf
    net_up
    munge_up
    ctld_up
    for n in "${nodes[@]}"; do slurmd_up "$n"; done
    for n in "${nodes[@]}"; do  # a node that was down (an earlier run's) comes back
        SLURM_CONF="$conf" scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
    done
    wait_for 60 "both nodes idle (sinfo -N)" nodes_idle
    exports
}

stop_pidfile() { # stop_pidfile FILE NAME: SIGTERM the recorded pid, then SIGKILL
    local file=$1 what=$2 pid
    alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$what (pid $pid) ignored SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

down() {
    if [ -f "$conf" ] && alive "$dir/slurmctld.pid"; then  # end every job first: no step outlives the cluster
        SLURM_CONF="$conf" scancel --full --quiet --cluster=epdctl --partition=debug 2>/dev/null \
            || SLURM_CONF="$conf" scancel --quiet --partition=debug 2>/dev/null || true
    fi
    for n in "${nodes[@]}"; do stop_pidfile "$dir/slurmd.$n.pid" "slurmd $n"; done
    stop_pidfile "$dir/slurmctld.pid" slurmctld
    stop_pidfile "$dir/munge/munged.pid" munged
    for n in "${nodes[@]}"; do
        ip link del "veth-$n" 2>/dev/null || true
        [ -e "/run/netns/epdctl-$n" ] && ip netns del "epdctl-$n"
    done
    ip link del "$bridge" 2>/dev/null || true
    # Job state and logs go with the cluster; the folder is ours (made by up).
    [ -f "$conf" ] && grep -q 'Written by tests/slurm/cluster.sh' "$conf" && rm -rf "$dir"
    return 0
}

status() {
    [ -f "$conf" ] || { say "not up ($conf missing)"; exit 1; }
    SLURM_CONF="$conf" sinfo -N
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: $0 up|down|status" ;;
esac
