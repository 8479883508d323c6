#!/usr/bin/env bash
# Side-by-side benchmark: mediaproxy and nginx (configured like the admins' block: try_files on the local
# root, then proxy_pass to the bucket) on the same data, in one run, driven by wrk. Prints ratios.
#
#   bash benches/side-by-side.sh            # defaults below; override with env vars
#   DURATION=10s FILES=2000 BIG_MB=1024 CONNS=32 bash benches/side-by-side.sh
#
# Fairness, as FIELD-NOTES.md asks: each server gets one core (nginx: one worker; mediaproxy: one tokio
# worker, both pinned to CPU 0), wrk runs pinned to CPU 1. nginx is measured at its best: access_log off,
# sendfile on, tcp_nopush off (Debian's `on` stalls loopback keep-alive ~40 ms), open_file_cache on,
# upstream keepalive. The bucket is a release build of s3s-fs with TCP_NODELAY, anonymous (a public bucket,
# as the nginx block uses). Everything binds 127.0.0.1; every load is bounded by DURATION.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15s}
CONNS=${CONNS:-32}
FILES=${FILES:-2000}
BIG_MB=${BIG_MB:-1024}
ROUNDS=${ROUNDS:-3}

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --locked --bin mediaproxy --example s3-server 2>&1 | tail -1
BIN=$PWD/target/release/mediaproxy
S3BIN=$PWD/target/release/examples/s3-server

W=$(mktemp -d /tmp/mediaproxy-bench.XXXXXX)
chmod 755 "$W"  # nginx workers run as an unprivileged user
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
hwm_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

echo "== data: $FILES local files of 30-80 KB, one ${BIG_MB} MiB object in the bucket ($W)"
mkdir -p "$W/local" "$W/s3/media" "$W/cache"
python3 - "$W/local" "$FILES" "$W/paths.txt" <<'PY'
import os, random, sys
root, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rnd = random.Random(42)
with open(out, "w") as paths:
    for i in range(n):
        key = "media_attachments/files/%03d/%03d/%03d/original/%016x.jpg" % (i // 1000000, i // 1000 % 1000, i % 1000, rnd.getrandbits(64))
        path = os.path.join(root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(os.urandom(rnd.randint(30_000, 80_000)))
        paths.write("/" + key + "\n")
PY

S3PORT=$(port)
taskset -c 1 "$S3BIN" "$W/s3" "$S3PORT" & pids+=($!)
wait_port "$S3PORT"
BIGKEY=media_attachments/files/999/999/999/original/big.mp4
head -c "$((BIG_MB << 20))" /dev/urandom > "$W/big.bin"
curl -sf -T "$W/big.bin" -H 'Content-Type: video/mp4' "http://127.0.0.1:$S3PORT/media/$BIGKEY" >/dev/null
rm -f "$W/big.bin"

NGPORT=$(port)
cat > "$W/nginx.conf" <<EOF
worker_processes 1;
worker_cpu_affinity 01;
daemon on;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 4096; }
http {
  include /etc/nginx/mime.types;
  access_log off;
  sendfile on; tcp_nopush off; tcp_nodelay on;
  keepalive_requests 1000000;
  open_file_cache max=20000 inactive=60s;
  client_body_temp_path $W/ngx-body; proxy_temp_path $W/ngx-proxy;
  fastcgi_temp_path $W/ngx-fcgi; uwsgi_temp_path $W/ngx-uwsgi; scgi_temp_path $W/ngx-scgi;
  upstream bucket { server 127.0.0.1:$S3PORT; keepalive 32; }
  server {
    listen 127.0.0.1:$NGPORT;
    root $W/local;
    location / {
      limit_except GET { deny all; }
      add_header Access-Control-Allow-Origin *;
      add_header X-Content-Type-Options nosniff;
      add_header X-Cache LOCAL;
      try_files \$uri @s3;
    }
    location @s3 {
      limit_except GET { deny all; }
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:$S3PORT;
      proxy_set_header Authorization "";
      proxy_hide_header Set-Cookie;
      proxy_ignore_headers Set-Cookie;
      proxy_pass http://bucket/media\$uri;
      add_header Access-Control-Allow-Origin *;
      add_header X-Content-Type-Options nosniff;
    }
  }
}
EOF
nginx -c "$W/nginx.conf" -e "$W/nginx-error.log"
wait_port "$NGPORT"
NGWORKER=$(pgrep -P "$(cat "$W/nginx.pid")" | head -1)

start_mediaproxy() {
  MPPORT=$(port)
  cat > "$W/mp.toml" <<EOF
[server]
listen = ["127.0.0.1:$MPPORT"]
[local]
roots = ["$W/local"]
[cache]
dir = "$W/cache"
[[upstream]]
name = "bucket"
type = "http"
url = "http://127.0.0.1:$S3PORT/media"
EOF
  TOKIO_WORKER_THREADS=1 MEDIAPROXY_LOG=warn taskset -c 0 "$BIN" serve --config "$W/mp.toml" & MPPID=$!
  pids+=($MPPID)
  wait_port "$MPPORT"
}
start_mediaproxy

cat > "$W/rotate.lua" <<EOF
local paths = {}
for line in io.lines("$W/paths.txt") do paths[#paths + 1] = line end
local i = math.random(#paths)
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
EOF

# wrk → "req/s p50_ms p99_ms"
run_wrk() {
  taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$W/rotate.lua" "$1" > "$W/wrk.out" 2>&1
  python3 - "$W/wrk.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(v):
    n, u = re.match(r"([\d.]+)(\w+)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"\s50%\s+(\S+)", t).group(1))
p99 = ms(re.search(r"\s99%\s+(\S+)", t).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
if errs: print("WARNING: non-2xx responses:", errs.group(1), file=sys.stderr)
print(f"{rps:.0f} {p50:.3f} {p99:.3f}")
PY
}

echo "== sanity: same bytes from both"
P1=$(head -1 "$W/paths.txt")
cmp <(curl -sf "http://127.0.0.1:$NGPORT$P1") <(curl -sf "http://127.0.0.1:$MPPORT$P1")
curl -sf "http://127.0.0.1:$MPPORT$P1" -o /dev/null -D - | grep -i '^x-cache'

echo "== local hits, $FILES files of 30-80 KB: wrk -t1 -c$CONNS -d$DURATION, $ROUNDS rounds alternating"
declare -a NG MP
for r in $(seq 1 "$ROUNDS"); do
  NG[r]=$(run_wrk "http://127.0.0.1:$NGPORT")
  MP[r]=$(run_wrk "http://127.0.0.1:$MPPORT")
  echo "round $r  nginx: ${NG[r]}   mediaproxy: ${MP[r]}   (req/s p50_ms p99_ms)"
done
python3 - "${NG[@]}" -- "${MP[@]}" <<'PY'
import sys
args = sys.argv[1:]; i = args.index("--")
ng = [list(map(float, a.split())) for a in args[:i]]; mp = [list(map(float, a.split())) for a in args[i+1:]]
import statistics
med = lambda rows, i: statistics.median(r[i] for r in rows)
best = lambda rows: max(rows, key=lambda r: r[0])
n, m = best(ng), best(mp)
print(f"local hits  median: nginx {med(ng,0):.0f} req/s p99 {med(ng,2):.2f} ms | mediaproxy {med(mp,0):.0f} req/s p99 {med(mp,2):.2f} ms"
      f" | ratio req/s {med(mp,0)/med(ng,0):.2f}x, p99 {med(mp,2)/med(ng,2):.2f}x")
print(f"local hits  best:   nginx {n[0]:.0f} req/s p99 {n[2]:.2f} ms | mediaproxy {m[0]:.0f} req/s p99 {m[2]:.2f} ms"
      f" | ratio req/s {m[0]/n[0]:.2f}x, p99 {m[2]/n[2]:.2f}x")
PY
echo "mediaproxy peak RSS after the load: $(hwm_kib "$MPPID") KiB"

echo "== ${BIG_MB} MiB object streamed through from the bucket (a fresh mediaproxy process)"
kill "$MPPID"; wait "$MPPID" 2>/dev/null || true
start_mediaproxy
before=$(hwm_kib "$MPPID")
mp_t=$(curl -sf -o /dev/null -w '%{time_total} %{size_download}' "http://127.0.0.1:$MPPORT/$BIGKEY")
after=$(hwm_kib "$MPPID")
ng_before=$(hwm_kib "$NGWORKER")
ng_t=$(curl -sf -o /dev/null -w '%{time_total} %{size_download}' "http://127.0.0.1:$NGPORT/$BIGKEY")
ng_after=$(hwm_kib "$NGWORKER")
direct_t=$(curl -sf -o /dev/null -w '%{time_total} %{size_download}' "http://127.0.0.1:$S3PORT/media/$BIGKEY")
python3 - "$mp_t" "$ng_t" "$direct_t" "$before" "$after" "$ng_before" "$ng_after" <<'PY'
import sys
mp, ng, d = (list(map(float, a.split())) for a in sys.argv[1:4])
before, after, ngb, nga = map(int, sys.argv[4:8])
mib = lambda r: r[1] / r[0] / 2**20
print(f"stream      direct bucket {mib(d):.0f} MiB/s | nginx {mib(ng):.0f} MiB/s | mediaproxy {mib(mp):.0f} MiB/s ({mib(mp)/mib(ng):.2f}x nginx)")
print(f"peak RSS    mediaproxy {before/1024:.1f} MiB before, {after/1024:.1f} MiB after {mp[1]/2**20:.0f} MiB streamed"
      f" | nginx worker {ngb/1024:.1f} -> {nga/1024:.1f} MiB")
PY
