#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ answer on loopback; start the ones that are down.
# Exits non-zero (and says which) when a service cannot be brought up: tests must fail,
# never skip, without their services.
set -u
ok=0
# Redis: a memory limit and an eviction policy that can never drop stream entries.
# With `noeviction` a full Redis refuses writes (the status fan-out then catches up from
# PostgreSQL once memory frees) instead of silently evicting keys such as status streams.
REDIS_PORT=${TASKFORGE_REDIS_PORT:-6379}
REDIS_MAXMEMORY=${TASKFORGE_REDIS_MAXMEMORY:-512mb}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
redis_get() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" config get "$1" 2>/dev/null | sed -n 2p; }
redis_limits() { # the local Redis is ours: give it a limit and a policy that cannot evict
  local r=(redis-cli -h 127.0.0.1 -p "$REDIS_PORT")
  [ "$(redis_get maxmemory-policy)" = noeviction ] || "${r[@]}" config set maxmemory-policy noeviction >/dev/null \
    || { echo "services: could not set Redis maxmemory-policy" >&2; return 1; }
  # Only a Redis without a limit gets ours: an operator's own limit is kept.
  [ "$(redis_get maxmemory)" != 0 ] || "${r[@]}" config set maxmemory "$REDIS_MAXMEMORY" >/dev/null \
    || { echo "services: could not set Redis maxmemory" >&2; return 1; }
}
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

wait_for() { # name, check, seconds
  local i
  for ((i = 0; i < $3 * 2; i++)); do "$2" && return 0; sleep 0.5; done
  echo "services: $1 did not come up" >&2; return 1
}

if ! pg_up; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  wait_for PostgreSQL pg_up 30 || ok=1
fi
if ! redis_up; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --maxmemory "$REDIS_MAXMEMORY" --maxmemory-policy noeviction \
    --dir /var/lib/redis --logfile /var/log/redis/taskforge.log || true
  wait_for Redis redis_up 15 || ok=1
fi
redis_up && { redis_limits || ok=1; }
if ! rabbit_up; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached || true
  for _ in $(seq 1 60); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 1; done
  wait_for RabbitMQ rabbit_up 30 || ok=1
fi
exit $ok
