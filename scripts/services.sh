# Sourced by scripts/test.sh and scripts/bench.sh: make sure PostgreSQL and Redis answer, starting
# them if they are installed but down, and say clearly what is missing if they cannot be had.
# Call: ensure_services <caller name>. Reads PGHOST, PGPORT, REDIS_HOST, REDIS_PORT (defaults: loopback).

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
REDIS_HOST=${REDIS_HOST:-127.0.0.1}
REDIS_PORT=${REDIS_PORT:-6379}

pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null || (echo > "/dev/tcp/$PGHOST/$PGPORT") 2>/dev/null; }
redis_up() { [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]; }

ensure_services() {
  local who=$1
  if ! pg_up; then
    echo "$who: PostgreSQL is not answering on $PGHOST:$PGPORT; trying to start it"
    if command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql >/dev/null 2>&1; then
      for v in $(ls /etc/postgresql); do pg_ctlcluster --skip-systemctl-redirect "$v" main start 2>/dev/null || true; done
    elif command -v pg_ctl >/dev/null 2>&1 && [ -n "${PGDATA:-}" ]; then
      pg_ctl -D "$PGDATA" -l "${PGDATA}/server.log" start || true
    fi
    for _ in $(seq 1 30); do pg_up && break; sleep 0.5; done
    pg_up || { echo "$who: PostgreSQL is missing or will not start (install postgresql, or point PGHOST/PGPORT at a server)"; return 2; }
  fi
  if ! redis_up; then
    echo "$who: Redis is not answering on $REDIS_HOST:$REDIS_PORT; trying to start it"
    if command -v redis-server >/dev/null 2>&1; then
      mkdir -p /tmp/chittycan-redis
      redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir /tmp/chittycan-redis --logfile /tmp/chittycan-redis/redis.log || true
    fi
    for _ in $(seq 1 30); do redis_up && break; sleep 0.5; done
    redis_up || { echo "$who: Redis is missing or will not start (install redis-server, or point REDIS_HOST/REDIS_PORT at a server)"; return 2; }
  fi
}

# Browser tests (tests/browser, Playwright) drive Debian's chromium, never a downloaded browser.
# Call: ensure_browser <caller name>. Installs the `chromium` package when /usr/bin/chromium is
# missing (needs root and Debian's package registry); says what is missing if that fails.
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

ensure_browser() {
  local who=$1
  [ -x "$CHROMIUM" ] && return 0
  echo "$who: $CHROMIUM is missing; installing Debian's chromium package (browser tests need it)"
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/tmp/chittycan-chromium-install.log 2>&1 || true
  fi
  [ -x "$CHROMIUM" ] || {
    echo "$who: $CHROMIUM is missing and Debian's chromium package could not be installed (the browser"
    echo "  tests need it; see /tmp/chittycan-chromium-install.log). As root on Debian: apt-get install chromium;"
    echo "  elsewhere set CHROMIUM=/path/to/a/chromium binary"
    return 2
  }
}
