#!/usr/bin/env bash
# Requests lost (and p99) during config reloads and during restarts, mediaproxy vs nginx, under the same
# load in one run: wrk, 32 connections, local files of 30-80 KB (the serving path both share).
#
#   bash benches/restart.sh                 # DURATION=12s EVENTS=3 by default
#
# nginx: `nginx -s reload`, and a restart as systemd does it (`nginx -s quit`, wait for the exit, start).
# mediaproxy: SIGHUP, and a restart under socket activation as systemd's .socket unit does it: a holder
# process keeps the listening socket and passes it to each new process (LISTEN_FDS/LISTEN_PID); SIGTERM,
# wait for the exit, start the next. Lost = wrk's socket errors (connect, read, write, timeout) plus
# non-2xx answers. Both servers run with their access logs off; everything binds 127.0.0.1 and each load
# is bounded by DURATION.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-12s}
EVENTS=${EVENTS:-3}
CONNS=${CONNS:-32}

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked --bin mediaproxy 2>&1 | tail -1
BIN=$PWD/target/release/mediaproxy

W=$(mktemp -d /tmp/mediaproxy-restart.XXXXXX)
chmod 755 "$W"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$W"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

mkdir -p "$W/local/media_attachments/files"
python3 - "$W/local/media_attachments/files" <<'PY'
import os, sys, random
random.seed(7)
for i in range(200):
    with open(os.path.join(sys.argv[1], f"{i}.jpg"), "wb") as f:
        f.write(os.urandom(random.randint(30_000, 80_000)))
PY
cat > "$W/paths.lua" <<'EOF'
local i = 0
request = function()
  i = (i + 1) % 200
  return wrk.format("GET", "/media_attachments/files/" .. i .. ".jpg")
end
EOF

NGPORT=$(port)
cat > "$W/nginx.conf" <<EOF
worker_processes 1;
daemon on;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 4096; }
http {
  include /etc/nginx/mime.types;
  access_log off;
  sendfile on; tcp_nodelay on;
  client_body_temp_path $W/ngx-body; proxy_temp_path $W/ngx-proxy;
  fastcgi_temp_path $W/ngx-fcgi; uwsgi_temp_path $W/ngx-uwsgi; scgi_temp_path $W/ngx-scgi;
  server {
    listen 127.0.0.1:$NGPORT;
    root $W/local;
    location / { try_files \$uri =404; }
  }
}
EOF
nginx -c "$W/nginx.conf"
wait_port "$NGPORT"

MPPORT=$(port)
cat > "$W/mp.toml" <<EOF
[server]
listen = ["127.0.0.1:$MPPORT"]
access_log = false
shutdown_timeout = "30s"
[local]
roots = ["$W/local"]
[cache]
dir = "$W/cache"
EOF
# The holder: binds the media port once and keeps it, as systemd's .socket unit does; SIGUSR1 restarts
# the proxy (SIGTERM, wait, start the next on the same socket), SIGUSR2 reloads it (SIGHUP).
cat > "$W/holder.py" <<'PY'
import os, signal, socket, subprocess, sys, time
port, binary, config = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(4096)
fd = s.fileno()
def start():
    cmd = f'exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve --config "$1"'
    return subprocess.Popen(["bash", "-c", cmd, binary, config], pass_fds=(fd,),
                            env=dict(os.environ, MEDIAPROXY_LOG="warn"))
child = start()
def restart(*_):
    global child
    child.send_signal(signal.SIGTERM); child.wait(); child = start()
signal.signal(signal.SIGUSR1, restart)
signal.signal(signal.SIGUSR2, lambda *_: child.send_signal(signal.SIGHUP))
signal.signal(signal.SIGTERM, lambda *_: (child.kill(), sys.exit(0)))
while True:
    time.sleep(3600)
PY
python3 "$W/holder.py" "$MPPORT" "$BIN" "$W/mp.toml" &
HOLDER=$!
pids+=("$HOLDER")
wait_port "$MPPORT"
sleep 0.5

secs=${DURATION%s}
# One wrk run while `event` fires EVENTS times, evenly spread; prints "lost p99 requests".
measure() {
  local url=$1 event=$2
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$W/paths.lua" "$url" > "$W/wrk.out" 2>&1 &
  local wrk_pid=$!
  for n in $(seq 1 "$EVENTS"); do
    sleep "$(python3 -c "print($secs / ($EVENTS + 1))")"
    $event
  done
  wait "$wrk_pid"
  if [ -n "${SHOW:-}" ]; then grep -E "Socket|Non-2xx" "$W/wrk.out" >&2 || true; fi
  python3 - "$W/wrk.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", t))
non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", t) or [0, 0])[1])
p99 = re.search(r"99%\s+([\d.]+\w+)", t).group(1)
reqs = re.search(r"(\d+) requests in", t).group(1)
print(f"{errs + non2xx} {p99} {reqs}")
PY
}

nginx_reload() { nginx -c "$W/nginx.conf" -s reload; }
nginx_restart() {
  local pid; pid=$(cat "$W/nginx.pid")
  nginx -c "$W/nginx.conf" -s quit
  while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
  nginx -c "$W/nginx.conf"
}
mp_reload() { kill -USR2 "$HOLDER"; }
mp_restart() { kill -USR1 "$HOLDER"; }

echo "== $EVENTS events during $DURATION of wrk -c$CONNS (lost = socket errors + non-2xx)"
printf '%-34s %8s %10s %10s\n' "" lost p99 requests
for row in "nginx -s reload:nginx_reload:$NGPORT" "mediaproxy SIGHUP:mp_reload:$MPPORT" \
           "nginx restart (quit, start):nginx_restart:$NGPORT" "mediaproxy restart (socket activation):mp_restart:$MPPORT"; do
  IFS=: read -r name event port <<< "$row"
  read -r lost p99 reqs <<< "$(measure "http://127.0.0.1:$port" "$event")"
  printf '%-34s %8s %10s %10s\n' "$name" "$lost" "$p99" "$reqs"
done
