#!/usr/bin/env bash
# Make this machine ready for dmcall: the one place that knows what a machine needs.
#
#   tools/machine.sh            what `make run` needs: Python with venv, RabbitMQ and Redis
#                               installed and answering
#   tools/machine.sh --browser  what `make test` needs: the same, and Debian's Chromium
#   tools/machine.sh --janus    what `make bench-janus` needs: the same, and Debian's Janus
#
# Debian packages that are missing are installed (apt-get; as root, or through sudo when
# it asks no password); otherwise it stops with the exact command to run. A local RabbitMQ
# or Redis that is down is started. RABBITMQ_URL / REDIS_URL pointing at another host are
# left alone: that server is not this machine's to install or start.
# DMCALL_CHROMIUM names the browser the tests drive (default /usr/bin/chromium).
set -euo pipefail

browser=0
janus=0
for arg in "$@"; do
  case "$arg" in
    --browser) browser=1 ;;
    --janus) janus=1 ;;
    *) echo "usage: $0 [--browser] [--janus]" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3}"
CHROMIUM="${DMCALL_CHROMIUM:-/usr/bin/chromium}"
RABBITMQ_URL="${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"

have() { command -v "$1" >/dev/null 2>&1; }

# host and port of a URL such as amqp://user:pw@host:5672/vhost
url_host() { local rest="${1#*://}"; rest="${rest##*@}"; rest="${rest%%/*}"; echo "${rest%:*}"; }
url_port() {
  local rest="${1#*://}"; rest="${rest##*@}"; rest="${rest%%/*}"
  if [[ "$rest" == *:* ]]; then echo "${rest##*:}"; else echo "$2"; fi
}
is_local() { case "$1" in 127.0.0.1 | localhost | "[::1]" | ::1) return 0 ;; *) return 1 ;; esac; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

rabbit_host="$(url_host "$RABBITMQ_URL")"; rabbit_port="$(url_port "$RABBITMQ_URL" 5672)"
redis_host="$(url_host "$REDIS_URL")"; redis_port="$(url_port "$REDIS_URL" 6379)"
[[ "$rabbit_host" == "localhost" ]] && rabbit_host=127.0.0.1
[[ "$redis_host" == "localhost" ]] && redis_host=127.0.0.1

# ------------------------------------------------------------------ packages
missing=()
if ! have "$PYTHON"; then
  missing+=(python3 python3-venv)
elif ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if is_local "$rabbit_host" && ! port_open "$rabbit_host" "$rabbit_port" && ! have rabbitmq-server; then
  missing+=(rabbitmq-server)
fi
if is_local "$redis_host" && ! port_open "$redis_host" "$redis_port" && ! have redis-server; then
  missing+=(redis-server)
fi
if [ "$browser" = 1 ] && [ ! -x "$CHROMIUM" ]; then
  missing+=(chromium)
fi
if [ "$janus" = 1 ] && [ ! -x /usr/bin/janus ]; then
  missing+=(janus)
fi

as_root() {  # as_root <command...>: run it as root, or return 1 when that is not possible
  if [ "$(id -u)" = 0 ]; then "$@"; elif have sudo && sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi
}

if [ "${#missing[@]}" -gt 0 ]; then
  echo "dmcall needs Debian packages: ${missing[*]}"
  if ! have apt-get; then
    echo "this machine has no apt-get: install ${missing[*]} with its package manager" >&2
    exit 1
  fi
  if as_root true; then
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "installing them needs root; run:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  if [ "$browser" = 1 ] && [ ! -x "$CHROMIUM" ]; then
    echo "chromium was installed but $CHROMIUM is not there: set DMCALL_CHROMIUM" >&2
    exit 1
  fi
fi

# ------------------------------------------------------------------ servers
wait_port() {  # wait_port <host> <port> <seconds>
  local i
  for ((i = 0; i < $3 * 4; i++)); do port_open "$1" "$2" && return 0; sleep 0.25; done
  return 1
}

start_rabbitmq() {
  local pidfile="/var/lib/rabbitmq/mnesia/rabbit@$(hostname).pid"
  if [ "$(id -u)" != 0 ]; then
    echo "RabbitMQ is down at $rabbit_host:$rabbit_port; start it as root:" >&2
    echo "  sudo rabbitmq-server -detached && sudo rabbitmqctl wait $pidfile" >&2
    exit 1
  fi
  echo "starting RabbitMQ (rabbitmq-server -detached)"
  rabbitmq-server -detached
  rabbitmqctl wait --timeout 120 "$pidfile" >/dev/null
}

start_redis() {
  echo "starting Redis on $redis_host:$redis_port"
  if ! redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" \
    --appendonly no --dir /tmp >/dev/null; then
    echo "Redis did not start; start it yourself:" >&2
    echo "  redis-server --daemonize yes --bind 127.0.0.1 --port $redis_port --save \"\" --appendonly no" >&2
    exit 1
  fi
}

if is_local "$rabbit_host" && ! port_open "$rabbit_host" "$rabbit_port"; then
  start_rabbitmq
  wait_port "$rabbit_host" "$rabbit_port" 60 || { echo "RabbitMQ did not come up" >&2; exit 1; }
fi
if is_local "$redis_host" && ! port_open "$redis_host" "$redis_port"; then
  start_redis
  wait_port "$redis_host" "$redis_port" 15 || { echo "Redis did not come up" >&2; exit 1; }
fi
