#!/usr/bin/env bash
# Cold-miss CPU of mediaproxy builds against nginx, interleaved, medians of ROUNDS: for deciding whether
# a change to the miss path helps. One run of the side-by-side bench moves by ±15 % on cold misses;
# comparing builds round by round, each beside nginx, does not.
#
#   bash benches/cold-miss-ab.sh target/release/mediaproxy /tmp/mediaproxy-before
#   ROUNDS=8 DURATION=3s bash benches/cold-miss-ab.sh A B C
#   FS=ext4 bash benches/cold-miss-ab.sh A B    # caches on a fresh loop-mounted ext4 each round
#   DIRS=made bash benches/cold-miss-ab.sh A B  # both caches' directory trees made beforehand
#
# Each round: a fresh tmpfs for both caches (ext4's inode allocator after a mass delete, up to a fifth of
# a miss's CPU for both servers, would swamp the difference), or with FS=ext4 a freshly made ext4 (what
# production runs: its creates, renames and mkdirs cost more than tmpfs's, for both servers), nginx (proxy_cache, one pinned worker)
# then each build (one pinned tokio worker), wrk -c32 on core 1 over keys never asked before. Prints
# the median CPU per miss of each build and of nginx beside it (and its user-space part), and the
# median of their ratios.
# Needs root (tmpfs), nginx, wrk, taskset; binds 127.0.0.1 only; every load is bounded by DURATION.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 BINARY [BINARY ...]" >&2; exit 2; }
ROUNDS=${ROUNDS:-5}
FS=${FS:-tmpfs}
case "$FS" in tmpfs|ext4) ;; *) echo "FS is tmpfs or ext4" >&2; exit 2;; esac
DURATION=${DURATION:-2s}
DIRS=${DIRS:-lazy}
case "$DIRS" in lazy|made) ;; *) echo "DIRS is lazy or made" >&2; exit 2;; esac
KEYS=${KEYS:-12000}
cd "$(dirname "$0")/.."
bins=(); for b in "$@"; do bins+=("$(realpath "$b")"); done
cargo build --release --locked --example s3-server 2>&1 | tail -1
S3BIN=$PWD/target/release/examples/s3-server

W=$(mktemp -d /tmp/cold-miss-ab.XXXXXX)
chmod 755 "$W"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
  sleep 0.3
  mountpoint -q "$W/c" && umount -l "$W/c"
  rm -rf "$W"
  rm -f "${IMG:-}"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
ticks() { awk '{print $14+$15, $14}' "/proc/$1/stat"; }  # all CPU ticks, user ticks

python3 - "$W" "$KEYS" <<'PY'
import os, random, sys
w, n = sys.argv[1], int(sys.argv[2]); rnd = random.Random(7)
with open(w + "/paths.txt", "w") as paths:
    for i in range(n):
        key = "cache/media_attachments/files/%03d/%03d/original/%016x.jpg" % (i // 1000, i % 1000, rnd.getrandbits(64))
        p = os.path.join(w, "s3/media", key); os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").write(os.urandom(rnd.randint(30_000, 80_000))); paths.write("/" + key + "\n")
PY
cat > "$W/paths.lua" <<L
local paths = {}
for line in io.lines("$W/paths.txt") do paths[#paths + 1] = line end
local i = 0
request = function() i = i + 1; return wrk.format("GET", paths[i]) end
L
S3PORT=$(port)
taskset -c 1 "$S3BIN" "$W/s3" "$S3PORT" & pids+=($!)
wait_port "$S3PORT"
mkdir -p "$W/c"

# CPU µs per request of the server process `pid` under 32 connections of new keys, and the user-space
# part of it (where mediaproxy's excess over nginx is: the kernel's part is about the same for both).
measure() {
  local pid=$1 p=$2 c0 c1 out n
  c0=$(ticks "$pid")
  out=$(taskset -c 1 wrk -t1 -c32 -d"$DURATION" -s "$W/paths.lua" "http://127.0.0.1:$p")
  c1=$(ticks "$pid")
  n=$(echo "$out" | grep -oE '[0-9]+ requests in' | cut -d' ' -f1)
  python3 -c "a0, u0 = map(int, '$c0'.split()); a1, u1 = map(int, '$c1'.split()); t = 1e6 / $(getconf CLK_TCK) / $n; print(round((a1 - a0) * t, 1), round((u1 - u0) * t, 1))"
}

for r in $(seq 1 "$ROUNDS"); do
  for i in "${!bins[@]}"; do
    if mountpoint -q "$W/c"; then umount "$W/c" 2>/dev/null || umount -l "$W/c"; fi
    if [ "$FS" = ext4 ]; then
      # A sparse image made anew each round: no round inherits another's allocator state.
      IMG=${IMG:-$(mktemp /var/tmp/cold-miss-ab.XXXXXX.img)}
      rm -f "$IMG"; truncate -s 4G "$IMG"; mkfs.ext4 -q -F "$IMG"; mount -o loop "$IMG" "$W/c"
    else
      mount -t tmpfs -o size=3g tmpfs "$W/c"
    fi
    chmod 755 "$W/c"
    if [ "$DIRS" = made ]; then
      # Both caches' directory trees made beforehand, as on a cache some hours old: nginx's levels=1:2
      # (16 x 256) and mediaproxy's v2/ab/c (256 x 16). On a fresh cache, each server's first miss into
      # each of its 4,096 directories also creates it: a quarter to a third of a round's misses.
      python3 - "$W/c" <<'PY'
import os, sys
c = sys.argv[1]
for a in range(16):
    for b in range(256):
        os.makedirs(f"{c}/ngx/{a:x}/{b:02x}")
for a in range(256):
    for b in range(16):
        os.makedirs(f"{c}/mp/v2/{a:02x}/{b:x}")
PY
      chown -R nobody "$W/c/ngx" 2>/dev/null || chmod -R 777 "$W/c/ngx"
    fi
    NGPORT=$(port); MPPORT=$(port)
    cat > "$W/nginx.conf" <<N
worker_processes 1;
worker_cpu_affinity 01;
daemon on;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush off; tcp_nodelay on;
  keepalive_requests 1000000;
  client_body_temp_path $W/c/nb; proxy_temp_path $W/c/np;
  fastcgi_temp_path $W/c/nf; uwsgi_temp_path $W/c/nu; scgi_temp_path $W/c/ns;
  upstream bucket { server 127.0.0.1:$S3PORT; keepalive 32; }
  proxy_cache_path $W/c/ngx levels=1:2 keys_zone=media:64m max_size=20g inactive=90d use_temp_path=off;
  server {
    listen 127.0.0.1:$NGPORT;
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
N
    nginx -c "$W/nginx.conf" -e "$W/nginx-error.log"
    wait_port "$NGPORT"
    read -r ng ngu <<< "$(measure "$(pgrep -P "$(cat "$W/nginx.pid")" | head -1)" "$NGPORT")"
    kill "$(cat "$W/nginx.pid")"; rm -f "$W/nginx.pid"
    cat > "$W/mp.toml" <<T
[server]
listen = ["127.0.0.1:$MPPORT"]
access_log = false
[local]
roots = []
[cache]
dir = "$W/c/mp"
max_size = "2GiB"
[[upstream]]
name = "bucket"
type = "http"
url = "http://127.0.0.1:$S3PORT/media"
T
    TOKIO_WORKER_THREADS=1 MEDIAPROXY_LOG=warn taskset -c 0 "${bins[$i]}" serve --config "$W/mp.toml" 2>/dev/null & mp=$!
    wait_port "$MPPORT"
    read -r m mu <<< "$(measure "$mp" "$MPPORT")"
    kill "$mp"; wait "$mp" 2>/dev/null || true
    echo "round $r  ${bins[$i]}: $m us/miss ($mu user), nginx $ng us/miss ($ngu user)"
    echo "$i $m $ng $mu $ngu" >> "$W/results"
  done
done
python3 - "$W/results" "${bins[@]}" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
for i, b in enumerate(sys.argv[2:]):
    v = [tuple(map(float, r[1:])) for r in rows if int(r[0]) == i]
    print(f"{b}: {st.median(r[0] for r in v):.0f} us/miss ({st.median(r[2] for r in v):.0f} user), "
          f"nginx {st.median(r[1] for r in v):.0f} ({st.median(r[3] for r in v):.0f} user), "
          f"ratio {st.median(r[0] / r[1] for r in v):.2f}x (" + " ".join(f"{r[0] / r[1]:.2f}" for r in v) + ")")
PY
