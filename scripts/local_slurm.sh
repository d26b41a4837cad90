#!/usr/bin/env bash
# A one-node Slurm cluster on loopback, for tests (Debian's slurm-wlm and munge; .ci/run installs them).
#   scripts/local_slurm.sh start   writes its own slurm.conf, starts munged, slurmctld and slurmd by
#                                  hand (no systemd here), waits for the node to be idle
#   scripts/local_slurm.sh stop    ends those three daemons, by their pid files
# Everything lives in $LOCAL_SLURM_DIR (default /tmp/megatron-fipo-slurm): its own munge socket and
# key, and a slurm.conf that clients find through SLURM_CONF=$LOCAL_SLURM_DIR/slurm.conf. A Slurm or
# munge already set up on the machine is left alone. Needs root (the daemons drop to slurm and munge).
set -euo pipefail
state=${LOCAL_SLURM_DIR:-/tmp/megatron-fipo-slurm}
export SLURM_CONF=$state/slurm.conf

stop_pidfile() {
    local pidfile=$1 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$pidfile"
}

case "${1:-}" in
start)
    mkdir -p "$state"/{ctld,d,munge}
    chown slurm:slurm "$state"/ctld
    # Clients reach the socket inside: x for all, nothing listable or writable.
    chown munge:munge "$state"/munge && chmod 711 "$state"/munge
    if [ ! -s "$state"/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of="$state"/munge/munge.key 2>/dev/null
        chown munge:munge "$state"/munge/munge.key && chmod 400 "$state"/munge/munge.key
    fi
    mem=$(( $(free -m | awk '/^Mem:/ {print $2}') - 1024 ))
    cat > "$SLURM_CONF" <<CONF
ClusterName=megatron-fipo-test
SlurmctldHost=localhost
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# cred_expire also holds a requeued job back this long (default 120 s): the tests requeue one.
AuthInfo=socket=$state/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# No accounting (no sacct): a finished job stays in 'scontrol show job' this long, for the tests.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    # Slurm 22.05 refuses CgroupPlugin=disabled; nothing uses cgroups with the plugins above.
    echo "CgroupPlugin=cgroup/v1" > "$state"/cgroup.conf
    # A pid file whose process is gone (a machine restart) is stale: start afresh.
    for daemon in munge/munged slurmctld slurmd; do
        pidfile=$state/$daemon.pid
        if [ -s "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then rm -f "$pidfile"; fi
    done
    [ -s "$state"/munge/munged.pid ] || runuser -u munge -- /usr/sbin/munged \
        --socket="$state"/munge/munge.socket --key-file="$state"/munge/munge.key \
        --pid-file="$state"/munge/munged.pid --log-file="$state"/munge/munged.log \
        --seed-file="$state"/munge/munged.seed
    [ -s "$state"/slurmctld.pid ] || /usr/sbin/slurmctld
    [ -s "$state"/slurmd.pid ] || /usr/sbin/slurmd
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "local Slurm up: export SLURM_CONF=$SLURM_CONF"
            exit 0
        fi
        sleep 1
    done
    echo "local Slurm did not come up; see $state/*.log and $state/munge/munged.log" >&2
    exit 1
    ;;
stop)
    stop_pidfile "$state"/slurmd.pid
    stop_pidfile "$state"/slurmctld.pid
    stop_pidfile "$state"/munge/munged.pid
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
