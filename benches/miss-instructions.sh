#!/usr/bin/env bash
# User-space instructions per cold miss of mediaproxy builds, counted by callgrind: for deciding whether a
# change to the miss path helps when timing cannot tell. On the VMs this project runs on, CPU time per
# miss moves by ±10-15 % between rounds (cold-miss-ab.sh needs many rounds to see 5 %); an instruction
# count moves by under 1 % between runs of one build.
#
#   bash benches/miss-instructions.sh target/release/mediaproxy /tmp/mediaproxy-before
#   KEYS=3000 TOP=25 bash benches/miss-instructions.sh target/release/mediaproxy
#
# Each build in turn: one tokio worker under `valgrind --tool=callgrind`, a local s3s bucket over HTTP,
# 200 misses to warm up, then KEYS misses (each key once, 8 keep-alive clients) with instrumentation on.
# Prints instructions per miss, and with TOP=n the n functions that execute the most of them themselves.
# NGINX=1 also counts nginx (proxy_cache, one process) on the same misses, for reference.
#
# What it does not see: the kernel (system calls, context switches: about half of a miss's CPU) and
# cache misses. And valgrind's CPU has no SHA or AVX-512 extensions, so SHA-256 and CRC32C run their
# portable code, and `rep movsb` counts one instruction a byte: compare builds with it, not functions
# with their cost on the real CPU.
# Needs valgrind (Debian's `valgrind`); binds 127.0.0.1 only; every load is bounded by KEYS.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 BINARY [BINARY ...]" >&2; exit 2; }
KEYS=${KEYS:-1500}
TOP=${TOP:-0}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 2; }
cd "$(dirname "$0")/.."
bins=(); for b in "$@"; do bins+=("$(realpath "$b")"); done
cargo build --release --locked --example s3-server 2>&1 | tail -1
S3BIN=$PWD/target/release/examples/s3-server

W=$(mktemp -d /tmp/miss-instructions.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

# Keys for every build (each build misses on all of them: a fresh cache each), plus 200 to warm up.
python3 - "$W" "$KEYS" <<'PY'
import os, random, sys
w, n = sys.argv[1], int(sys.argv[2]); rnd = random.Random(7)
with open(w + "/paths.txt", "w") as paths:
    for i in range(n + 200):
        key = "cache/media_attachments/files/%03d/%03d/original/%016x.jpg" % (i // 1000, i % 1000, rnd.getrandbits(64))
        p = os.path.join(w, "s3/media", key); os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").write(os.urandom(rnd.randint(30_000, 80_000))); paths.write(key + "\n")
PY
head -n "$KEYS" "$W/paths.txt" > "$W/run.txt"
tail -n 200 "$W/paths.txt" > "$W/warm.txt"
cat > "$W/load.py" <<'PY'
# GETs every key of the list once, over 8 keep-alive connections; every answer must be a 200.
import http.client, sys, threading
port, keys = int(sys.argv[1]), [l.strip() for l in open(sys.argv[2]) if l.strip()]
lock, it, bad = threading.Lock(), iter(keys), []
def client():
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while True:
        with lock:
            key = next(it, None)
        if key is None:
            return
        conn.request("GET", "/" + key)
        r = conn.getresponse(); r.read()
        if r.status != 200:
            bad.append((key, r.status))
threads = [threading.Thread(target=client) for _ in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
if bad:
    sys.exit(f"{len(bad)} answers were not 200, e.g. {bad[0]}")
PY

S3PORT=$(port)
"$S3BIN" "$W/s3" "$S3PORT" & pids+=($!)
wait_port "$S3PORT"

# count NAME PID DUMP: instructions per miss of the server PID (under callgrind, on $PORT) over the keys.
count() {
  python3 "$W/load.py" "$PORT" "$W/warm.txt"
  callgrind_control -i on "$2" > /dev/null 2>&1
  python3 "$W/load.py" "$PORT" "$W/run.txt"
  callgrind_control -i off "$2" > /dev/null 2>&1
  callgrind_control -d "$2" > /dev/null 2>&1
  kill "$2"; wait "$2" 2>/dev/null || true
  local dump total
  dump=$(ls "$3".* | head -1)
  total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
  echo "$1: $((total / KEYS)) instructions per cold miss ($total over $KEYS misses)"
  if [ "$TOP" -gt 0 ]; then
    callgrind_annotate "$dump" 2>/dev/null | grep -E '^ *[0-9,]+ \(' | grep -v "PROGRAM TOTALS" \
      | sed -E 's|/root/.cargo/registry/src/[^/]+/||; s|/rustc/[0-9a-f]+/library/||' | head -n "$TOP" || true
  fi
}

if [ -n "${NGINX:-}" ]; then
  command -v nginx >/dev/null || { echo "NGINX=1 needs nginx" >&2; exit 2; }
  PORT=$(port)
  mkdir -p "$W/ngx-cache"
  cat > "$W/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on; tcp_nopush off; tcp_nodelay on;
  client_body_temp_path $W/ngx-body; proxy_temp_path $W/ngx-proxy;
  fastcgi_temp_path $W/ngx-fcgi; uwsgi_temp_path $W/ngx-uwsgi; scgi_temp_path $W/ngx-scgi;
  upstream bucket { server 127.0.0.1:$S3PORT; keepalive 32; }
  proxy_cache_path $W/ngx-cache levels=1:2 keys_zone=media:64m max_size=20g inactive=90d use_temp_path=off;
  server {
    listen 127.0.0.1:$PORT;
    location / {
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://bucket/media\$uri;
      proxy_cache media;
      proxy_cache_valid 200 90d;
      proxy_cache_lock on;
    }
  }
}
EOF
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$W/ngx.out" \
    nginx -c "$W/nginx.conf" 2> "$W/valgrind-nginx.log" & ng=$!
  pids+=($ng)
  wait_port "$PORT"
  count "nginx (reference)" "$ng" "$W/ngx.out"
fi

for bin in "${bins[@]}"; do
  rm -rf "$W/cache" "$W"/cg.out*
  MPPORT=$(port)
  PORT=$MPPORT
  cat > "$W/mp.toml" <<EOF
[server]
listen = ["127.0.0.1:$MPPORT"]
access_log = false
[cache]
dir = "$W/cache"
[[upstream]]
name = "bucket"
type = "http"
url = "http://127.0.0.1:$S3PORT/media"
EOF
  TOKIO_WORKER_THREADS=1 MEDIAPROXY_LOG=warn valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$W/cg.out" "$bin" serve --config "$W/mp.toml" 2> "$W/valgrind.log" & mp=$!
  pids+=($mp)
  wait_port "$MPPORT"
  count "$bin" "$mp" "$W/cg.out"
done
