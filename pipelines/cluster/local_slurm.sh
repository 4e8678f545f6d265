#!/usr/bin/env bash
# A single-node SLURM on this machine (munged, slurmctld, slurmd from Debian's packages), to
# try pipelines/cluster/slurm_example.py where no cluster is at hand; tests/cohort/test_slurm.py
# starts it the same way.
#
#   pipelines/cluster/local_slurm.sh start [DIR]    # install if missing (root + apt-get), start, run a test job
#   export SLURM_CONF=DIR/slurm.conf                # what `start` prints: sbatch, squeue, dask-jobqueue use it
#   pipelines/cluster/local_slurm.sh status [DIR]   # exit 0 when all three daemons of DIR run
#   pipelines/cluster/local_slurm.sh stop [DIR]     # stop the daemons whose pid files are in DIR
#
# DIR (default $WSI_MIL_SLURM_DIR or /tmp/wsi-mil-slurm) holds everything: slurm.conf, its own
# munge key and socket, state, spool, logs and pid files; nothing under /etc is changed.
# `start` is idempotent: daemons of DIR that already run are kept. The node is this host
# (`slurmd -C`), partition `debug`; ports 26817/26818 (SLURM_LOCAL_PORTS="ctld slurmd" to
# change) so a machine's own SLURM is left alone. No cgroups (proctrack/linuxproc,
# task/none), so it also runs in containers without systemd. slurmd runs as root.
#
# Exit codes: 0 ok; 1 the daemons or the test job failed (the log lines are printed);
# 3 SLURM cannot run here (not root, packages missing and not installable).
set -euo pipefail

cmd=${1:-}
DIR=${2:-${WSI_MIL_SLURM_DIR:-/tmp/wsi-mil-slurm}}
read -r CTLD_PORT SLURMD_PORT <<<"${SLURM_LOCAL_PORTS:-26817 26818}"
CONF=$DIR/slurm.conf
DAEMONS=(slurmd slurmctld munged)  # stop order

die() { echo "local_slurm: $2" >&2; exit "$1"; }

pidfile() {
    case $1 in
        munged) echo "$DIR/munge/munged.pid" ;;
        *) echo "$DIR/$1.pid" ;;
    esac
}

# The pid of daemon $1 of DIR when it runs, else nothing (a pid file of a dead or reused pid counts as none).
alive() {
    local f pid
    f=$(pidfile "$1")
    [ -s "$f" ] || return 1
    pid=$(cat "$f")
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] && echo "$pid"
}

ensure_packages() {
    local missing=()
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
    command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        die 3 "missing ${missing[*]}: install Debian's munge slurmctld slurmd slurm-client (needs root and apt-get)"
    fi
    echo "local_slurm: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"${TMPDIR:-/tmp}/local_slurm-apt.log" 2>&1 \
        || { tail -n 20 "${TMPDIR:-/tmp}/local_slurm-apt.log" >&2; die 3 "apt-get install ${missing[*]} failed"; }
}

write_conf() {
    local host node
    host=$(hostname -s)
    # This host's sockets, cores and memory as slurmd sees them (first line of `slurmd -C`).
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die 1 "slurmd -C did not describe this node: $node"
    mkdir -p "$DIR"/{state,log,munge,munge-key} "$DIR/spool/slurmd-$host"
    chmod 755 "$DIR" "$DIR/munge"  # munged wants its socket folder reachable by all
    chmod 700 "$DIR/munge-key"
    if [ ! -s "$DIR/munge-key/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge-key/munge.key" bs=1024 count=1 status=none
        chmod 600 "$DIR/munge-key/munge.key"
    fi
    cat >"$CONF" <<EOF
# Written by pipelines/cluster/local_slurm.sh: a single-node SLURM without cgroups.
ClusterName=wsimil-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

stop() {
    local d pid
    for d in "${DAEMONS[@]}"; do
        pid=$(alive "$d") || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
        [ -d "/proc/$pid" ] && kill -9 "$pid" 2>/dev/null
        echo "local_slurm: stopped $d (pid $pid)"
    done
    return 0
}

fail_start() {
    echo "local_slurm: $1 did not start; last log lines:" >&2
    tail -n 15 "$2" >&2 2>/dev/null || true
    stop >&2
    exit 1
}

start() {
    [ "$(id -u)" = 0 ] || die 3 "slurmd must run as root (this is uid $(id -u))"
    ensure_packages
    export SLURM_CONF=$CONF
    if alive munged >/dev/null && alive slurmctld >/dev/null && alive slurmd >/dev/null; then
        echo "local_slurm: already running in $DIR"
    else
        stop  # a partial set from an earlier start
        write_conf
        munged --key-file="$DIR/munge-key/munge.key" --socket="$DIR/munge/munge.socket" \
            --pid-file="$(pidfile munged)" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
            || fail_start munged "$DIR/log/munged.log"
        # -c: start with an empty queue (jobs of an earlier session are not recovered).
        slurmctld -c -f "$CONF" || fail_start slurmctld "$DIR/log/slurmctld.log"
        slurmd -f "$CONF" || fail_start slurmd "$DIR/log/slurmd.log"
    fi
    local state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1 || true)
        case $state in idle | mix | alloc) break ;; esac
        sleep 0.5
    done
    case $state in
        idle | mix | alloc) ;;
        *) fail_start "the node (state '${state:-no answer}')" "$DIR/log/slurmctld.log" ;;
    esac
    # One real job through the whole chain: sbatch → slurmctld → slurmd → slurmstepd.
    local out="$DIR/log/check-job.out"
    rm -f "$out"
    timeout 60 sbatch --wait --quiet -o "$out" --wrap 'echo "job $SLURM_JOB_ID on $(hostname)"' \
        || fail_start "a test job (sbatch --wrap)" "$DIR/log/slurmd.log"
    echo "local_slurm: $(cat "$out") — SLURM is up; use it with:"
    echo "export SLURM_CONF=$CONF"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status)
        for d in "${DAEMONS[@]}"; do
            pid=$(alive "$d") || { echo "$d: not running"; exit 1; }
            echo "$d: pid $pid"
        done
        ;;
    *) die 2 "usage: $0 start|status|stop [DIR]" ;;
esac
