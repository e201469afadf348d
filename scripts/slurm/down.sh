#!/usr/bin/env bash
# Stop the localhost SLURM cluster started by scripts/slurm/up.sh, by the pids it recorded.
# Daemons that up.sh found already running (a system munged or MariaDB) have no pid file there and
# are left alone. Controller state and accounting survive, so job ids keep counting up.
set -euo pipefail

RUN=${VWN_SLURM_DIR:-/var/lib/vwn-slurm}/run

for name in slurmd slurmctld slurmdbd mariadbd munged; do
    pid=$(cat "$RUN/$name.pid" 2>/dev/null) || continue
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]; then
        kill -TERM "$pid"
        for _ in $(seq 100); do
            [[ -e /proc/$pid ]] || break
            sleep 0.1
        done
        if [[ -e /proc/$pid ]]; then
            echo "slurm down: $name ($pid) ignored SIGTERM for 10 s; killing it" >&2
            kill -KILL "$pid"
        fi
        echo "slurm down: stopped $name ($pid)"
    fi
    rm -f "$RUN/$name.pid"
done
