#!/usr/bin/env bash
# Local development: run a Celery worker and beat for one INI, stop both on exit.
#
#   ./run-celery.bash conf/example.ini
#
# The INI needs a broker that other processes can read: Redis, or conf/example.ini's SQLite
# file. An eager or memory:// INI, such as development.ini, is refused with one line (status 2).
# Extra options: WORKER_OPTS="-c 2 -l debug" BEAT_OPTS="-s var/celerybeat-schedule" ./run-celery.bash dev.ini
# Ctrl-C, SIGTERM, or either process exiting stops the other one too; the
# script exits with the status of the process that ended first (or 130/143).
set -u

if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  echo "usage: $0 INI   (env: WORKER_OPTS, BEAT_OPTS; default '-l info')" >&2
  exit 2
fi
ini=$1

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Prefer the project's own virtualenv, so the script works without activating it.
if [ -x "$here/.venv/bin/ws-celery" ]; then
  ws_celery="$here/.venv/bin/ws-celery"
elif ws_celery=$(command -v ws-celery); then
  :
else
  echo "run-celery: ws-celery not found (no $here/.venv/bin/ws-celery and none on PATH)" >&2
  exit 127
fi

# A worker and beat need a broker they can share. An eager or memory:// INI (development.ini
# here) would start both and then never pass them a message: refuse it before starting anything.
python="$(dirname "$ws_celery")/python"
[ -x "$python" ] || python=python3
why=$("$python" - "$ini" <<'PY'
import sys

ini = sys.argv[1]
try:
    from pyramid.paster import get_appsettings

    from websauna_tasks.config import celery_config_from_settings
    from websauna_tasks.config_uri import config_file

    conf = celery_config_from_settings(get_appsettings(ini))
except Exception:
    sys.exit(0)  # ws-celery reads the INI again and says what is wrong with it
broker = str(conf.get("broker_url") or "")
if conf.get("task_always_eager"):
    print(f"{config_file(ini) or ini} runs tasks eagerly in the web process (task_always_eager): "
          "a worker and beat would get no message")
elif broker.split("://", 1)[0] == "memory":
    print(f"{config_file(ini) or ini} has the in-process broker {broker}: "
          "a worker and beat in other processes would never share a message")
else:
    sys.exit(0)
sys.exit(3)
PY
)
# Only the refusal's own status stops here: a Python that cannot run the check leaves it to ws-celery.
if [ $? -eq 3 ]; then
  echo "run-celery: $why; give an INI with a real broker (Redis, or conf/example.ini's SQLite file)" >&2
  exit 2
fi

pids=()

stop() {
  # Runs once: clear the traps so a second signal does not re-enter.
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null
    # Worker's warm shutdown lets running tasks finish; wait for both.
    wait "${pids[@]}" 2>/dev/null
  fi
}
trap 'stop' EXIT
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM

# shellcheck disable=SC2086  # the *_OPTS are meant to be split into words
"$ws_celery" "$ini" -- worker ${WORKER_OPTS:--l info} &
pids+=($!)
echo "run-celery: worker pid $!"

# shellcheck disable=SC2086
"$ws_celery" "$ini" -- beat ${BEAT_OPTS:--l info} &
pids+=($!)
echo "run-celery: beat pid $!"

# Returns when the first of the two exits (or a trapped signal arrives);
# then the EXIT trap stops the other.
wait -n
status=$?
exit "$status"
