#!/usr/bin/env bash
# A one-node Slurm cluster on loopback, for tests: `start` writes the config and starts munged,
# slurmctld and slurmd by hand (no systemd here) and waits for the node to be idle; `stop` ends them.
# Needs Debian's slurm-wlm and munge (.ci/run installs them) and root.
set -euo pipefail
state=/tmp/megatron-fipo-slurm
case "${1:-}" in
start)
    mkdir -p "$state"/{ctld,d} /etc/slurm /run/munge
    chown slurm:slurm "$state"/ctld
    chown munge:munge /run/munge
    [ -s /etc/munge/munge.key ] || (dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key)
    mem=$(( $(free -m | awk '/^Mem:/ {print $2}') - 1024 ))
    cat > /etc/slurm/slurm.conf <<CONF
ClusterName=megatron-fipo-test
SlurmctldHost=localhost
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    # Slurm 22.05 refuses CgroupPlugin=disabled; nothing uses cgroups with the plugins above.
    echo "CgroupPlugin=cgroup/v1" > /etc/slurm/cgroup.conf
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
    pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then exit 0; fi
        sleep 1
    done
    echo "local Slurm did not come up; see $state/*.log" >&2
    exit 1
    ;;
stop)
    pkill -x slurmd || true
    pkill -x slurmctld || true
    pkill -x munged || true
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
