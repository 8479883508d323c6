#!/usr/bin/env bash
# Side-by-side benchmark: mediaproxy and nginx (configured like the admins' block: try_files on the local
# root, then proxy_pass to the bucket with proxy_cache) on the same data, in one run, driven by wrk.
# Prints ratios.
#
#   bash benches/side-by-side.sh            # defaults below; override with env vars
#   DURATION=10s FILES=2000 HIT_KEYS=10000 BIG_MB=1024 INDEX_ENTRIES=1000000 bash benches/side-by-side.sh
#
# Phases: local hits (try_files); cache hits (HIT_KEYS keys, warm; nginx proxy_cache vs mediaproxy's
# cache); cold misses (each key once: direct bucket GET vs nginx vs mediaproxy, sequential, p50/p99; then
# 32 concurrent, ROUNDS rounds alternating, each over COLD_KEYS keys of its own);
# 8 clients streaming a 50 MiB object; one BIG_MB object through each with peak RSS; start-up time and
# RSS with INDEX_ENTRIES cache entries on disk.
#
# Fairness, as FIELD-NOTES.md asks: each server gets one core (nginx: one worker; mediaproxy: one tokio
# worker, both pinned to CPU 0), wrk runs pinned to CPU 1. nginx is measured at its best: access_log off,
# sendfile on, tcp_nopush off (Debian's `on` stalls loopback keep-alive ~40 ms), open_file_cache on,
# upstream keepalive. The bucket is a release build of s3s-fs with TCP_NODELAY, anonymous (a public bucket,
# as the nginx block uses). Everything binds 127.0.0.1; every load is bounded by DURATION or a key count.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15s}
CONNS=${CONNS:-32}
FILES=${FILES:-2000}
HIT_KEYS=${HIT_KEYS:-10000}
MISS_KEYS=${MISS_KEYS:-1000}
COLD_KEYS=${COLD_KEYS:-8000}    # per server and round of the concurrent cold-miss run (each key asked once)
COLD_DURATION=${COLD_DURATION:-2s}
BIG_MB=${BIG_MB:-1024}
INDEX_ENTRIES=${INDEX_ENTRIES:-1000000}
ROUNDS=${ROUNDS:-3}
# Hits are also measured at this fixed rate (req/s, the same for both servers; 0 skips it): see below.
FIXED_RATE=${FIXED_RATE:-20000}
FIXED_DURATION=${FIXED_DURATION:-5}
# PROFILE=1: also record mediaproxy with `perf record -g` during one more run of each scenario (local
# hits, cache hits, concurrent cold misses) and print the top of each profile.
PROFILE=${PROFILE:-}

# Room on /tmp, checked now rather than ten minutes in: every small object once in the bucket or the local
# root, the ones each proxy caches (hits, misses, up to every cold key) twice, the big objects three
# times (bucket and both caches), and the INDEX_ENTRIES placeholders (empty files: their 65,536
# directories and their inodes). 60 KB a small object, with its block slack.
small=$((FILES + HIT_KEYS + 3 * MISS_KEYS + (2 * ROUNDS + 1) * COLD_KEYS + 2 * (HIT_KEYS + MISS_KEYS + ROUNDS * COLD_KEYS)))
need_mb=$((small * 60 / 1024 + 3 * BIG_MB + 3 * 50 + 256))
need_inodes=$((small + INDEX_ENTRIES + 70000))
free_mb=$(df -Pk /tmp | awk 'NR == 2 {print int($4 / 1024)}')
free_inodes=$(df -Pi /tmp | awk 'NR == 2 {print $4}')
if [ "$free_mb" -lt "$need_mb" ] || { [ "$free_inodes" != "-" ] && [ "$free_inodes" -lt "$need_inodes" ]; }; then
  echo "/tmp has $free_mb MiB and $free_inodes inodes free; this run needs about $need_mb MiB and $need_inodes inodes (lower BIG_MB, INDEX_ENTRIES or the key counts, or free some)" >&2
  exit 1
fi

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
command -v taskset >/dev/null || need+=(util-linux)
[ -n "$PROFILE" ] && ! command -v perf >/dev/null && need+=(linux-perf)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --locked --bin mediaproxy --example s3-server --example rate-load 2>&1 | tail -1
BIN=$PWD/target/release/mediaproxy
S3BIN=$PWD/target/release/examples/s3-server
RATELOAD=$PWD/target/release/examples/rate-load

W=$(mktemp -d /tmp/mediaproxy-bench.XXXXXX)
chmod 755 "$W" # nginx workers run as an unprivileged user
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

echo "== data: $FILES local files, $HIT_KEYS + 3x$MISS_KEYS bucket objects (30-80 KB), 50 MiB and ${BIG_MB} MiB objects ($W)"
mkdir -p "$W/local" "$W/s3/media" "$W/cache"
python3 - "$W" "$FILES" "$HIT_KEYS" "$MISS_KEYS" "$COLD_KEYS" "$ROUNDS" <<'PY'
import os, random, sys
w, files, hits, misses, cold, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rnd = random.Random(42)
def make(root, prefix, n, out):
    with open(out, "w") as paths:
        for i in range(n):
            key = "%smedia_attachments/files/%03d/%03d/original/%016x.jpg" % (prefix, i // 1000, i % 1000, rnd.getrandbits(64))
            path = os.path.join(root, key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(os.urandom(rnd.randint(30_000, 80_000)))
            paths.write("/" + key + "\n")
make(w + "/local", "", files, w + "/paths.txt")
# Written straight into s3s-fs's directory: the same objects for both proxies.
make(w + "/s3/media", "cache/", hits, w + "/hit-paths.txt")
for who in ("direct", "nginx", "mediaproxy"):
    make(w + "/s3/media", "cache/", misses, w + "/miss-" + who + ".txt")
# Each round of the concurrent cold misses asks keys of its own; the profile one more set.
for r in range(1, rounds + 1):
    for who in ("nginx", "mediaproxy"):
        make(w + "/s3/media", "cache/", cold, w + "/conc-%s-%d.txt" % (who, r))
make(w + "/s3/media", "cache/", cold, w + "/conc-profile.txt")
PY

S3PORT=$(port)
taskset -c 1 "$S3BIN" "$W/s3" "$S3PORT" & pids+=($!)
wait_port "$S3PORT"
upload() { # KEY MiB
  head -c "$(($2 << 20))" /dev/urandom > "$W/upload.bin"
  curl -sf -T "$W/upload.bin" -H 'Content-Type: video/mp4' "http://127.0.0.1:$S3PORT/media/$1" >/dev/null
  rm -f "$W/upload.bin"
}
BIGKEY=media_attachments/files/999/999/999/original/big.mp4
VIDKEY=media_attachments/files/888/888/888/original/video.mp4
upload "$BIGKEY" "$BIG_MB"
upload "$VIDKEY" 50

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
  proxy_cache_path $W/ngx-cache levels=1:2 keys_zone=media:64m max_size=20g inactive=90d use_temp_path=off;
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
      proxy_cache media;
      proxy_cache_valid 200 90d;
      proxy_cache_valid 404 5m;
      proxy_cache_lock on;
      proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
      add_header Access-Control-Allow-Origin *;
      add_header X-Content-Type-Options nosniff;
      add_header X-Cache \$upstream_cache_status;
    }
  }
}
EOF
nginx -c "$W/nginx.conf" -e "$W/nginx-error.log"
wait_port "$NGPORT"
NGWORKER=$(pgrep -P "$(cat "$W/nginx.pid")" | head -1)

MPPORT=$(port)
cat > "$W/mp.toml" <<EOF
[server]
listen = ["127.0.0.1:$MPPORT"]
access_log = false
[local]
roots = ["$W/local"]
[cache]
dir = "$W/cache"
max_size = "20GiB"
[[upstream]]
name = "bucket"
type = "http"
url = "http://127.0.0.1:$S3PORT/media"
EOF
start_mediaproxy() {
  TOKIO_WORKER_THREADS=1 MEDIAPROXY_LOG=${1:-warn} taskset -c 0 "$BIN" serve --config "$W/mp.toml" 2> "$W/mp.log" & MPPID=$!
  pids+=($MPPID)
  wait_port "$MPPORT"
}
start_mediaproxy

for list in conc-profile $(for r in $(seq 1 "$ROUNDS"); do echo "conc-nginx-$r conc-mediaproxy-$r"; done); do
  # Each key once: past the end of the list the run is no longer all misses, and says so.
  cat > "$W/$list.lua" <<EOF
local paths = {}
for line in io.lines("$W/$list.txt") do paths[#paths + 1] = line end
local i, wrapped = 0, false
request = function()
  i = i + 1
  if i > #paths then
    i = 1
    if not wrapped then io.write("WRAPPED\\n") end
    wrapped = true
  end
  return wrk.format("GET", paths[i])
end
EOF
done
for list in paths hit-paths; do
  cat > "$W/$list.lua" <<EOF
local paths = {}
for line in io.lines("$W/$list.txt") do paths[#paths + 1] = line end
local i = math.random(#paths)
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
EOF
done

# Server CPU is read from /proc (utime+stime of every process of the server: nginx's master and workers,
# mediaproxy's one process) before and after each run: CPU microseconds per request do not depend on
# how fast the load generator is, req/s do. wrk's own CPU share is reported too: at ~100 % the client,
# not the server, set the pace, and a req/s ratio says nothing.
cpu_ticks() { local t=0 p v; for p in "$@"; do v=$(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null) && t=$((t + v)); done; echo $t; }
# CPU ticks of this shell's children that have been waited for (the curls below): their share of core 1.
children_ticks() { awk '{print $16+$17}' /proc/$$/stat; }
ng_pids() { echo "$(cat "$W/nginx.pid") $(pgrep -P "$(cat "$W/nginx.pid")" | tr '\n' ' ')"; }

# run_wrk URL LIST PIDS → "req/s p50_ms p99_ms server_us_per_req client_cpu_pct"
run_wrk() {
  python3 - "$1" "$W/$2.lua" "$DURATION" "$CONNS" "$3" <<'PY'
import os, re, resource, subprocess, sys, time
url, lua, duration, conns, pids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5].split()
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    total = 0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(f[11]) + int(f[12])
    return total / tick
def children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
c0, k0, t0 = cpu(), children(), time.monotonic()
t = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}", "--latency", "-s", lua, url],
                   capture_output=True, text=True).stdout
wall, server, client = time.monotonic() - t0, cpu() - c0, children() - k0
def ms(v):
    n, u = re.match(r"([\d.]+)(\w+)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
n = int(re.search(r"(\d+) requests in", t).group(1))
p50 = ms(re.search(r"\s50%\s+(\S+)", t).group(1))
p99 = ms(re.search(r"\s99%\s+(\S+)", t).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
if errs: print("WARNING: non-2xx responses:", errs.group(1), file=sys.stderr)
if "WRAPPED" in t: print("WARNING: the key list ran out and wrapped: later requests were not misses", file=sys.stderr)
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {server * 1e6 / max(n, 1):.1f} {client * 100 / wall:.0f}")
PY
}

# profiled LABEL COMMAND…: runs COMMAND while perf samples mediaproxy, then prints the hottest symbols
profiled() {
  local label=$1; shift
  if [ -z "$PROFILE" ]; then "$@"; return; fi
  perf record -q -g -F 999 -p "$MPPID" -o "$W/perf-$label.data" 2>/dev/null & local perf=$!
  sleep 0.2
  "$@"
  kill -INT "$perf"; wait "$perf" 2>/dev/null || true
  echo "--- perf: top of mediaproxy's profile, $label (self time) ---" >&2
  perf report -i "$W/perf-$label.data" --no-children --stdio --percent-limit 1 -g none \
    --sort dso,symbol 2>/dev/null | grep -E '^ +[0-9]' | head -30 >&2
}

# compare LABEL LIST: wrk rounds alternating nginx / mediaproxy; median and best ratios, CPU per request
compare() {
  local label=$1 list=$2 r
  local -a NG MP
  # An unmeasured warm-up for each (allocators, page cache, nginx's open_file_cache).
  DURATION=3s run_wrk "http://127.0.0.1:$NGPORT" "$list" "$(ng_pids)" >/dev/null
  DURATION=3s run_wrk "http://127.0.0.1:$MPPORT" "$list" "$MPPID" >/dev/null
  for r in $(seq 1 "$ROUNDS"); do
    NG[r]=$(run_wrk "http://127.0.0.1:$NGPORT" "$list" "$(ng_pids)")
    MP[r]=$(run_wrk "http://127.0.0.1:$MPPORT" "$list" "$MPPID")
    echo "round $r  nginx: ${NG[r]}   mediaproxy: ${MP[r]}   (req/s p50_ms p99_ms server_cpu_us/req client_cpu_%)"
  done
  summarize "$label" "${NG[@]}" -- "${MP[@]}"
  [ -n "$PROFILE" ] && profiled "${label// /-}" run_wrk "http://127.0.0.1:$MPPORT" "$list" "$MPPID" >/dev/null
  [ "$FIXED_RATE" != 0 ] && fixed_rate "$label" "$list"
  return 0
}

# fixed_rate LABEL LIST: latency at the same offered load for both. wrk's percentiles above are taken
# at whatever rate wrk and the server reach together, with wrk near 100 % of its core on hits: a faster
# server makes a busier client, and the client's queueing is in the percentiles. Here rate-load
# (examples/rate-load.rs) sends FIXED_RATE requests a second, open loop, over CONNS connections, to
# each server in turn, ROUNDS rounds; the medians of each percentile are compared.
fixed_rate() {
  local label=$1 list=$2 r
  local -a NG MP
  echo "-- $label at a fixed $FIXED_RATE req/s, ${FIXED_DURATION}s, $CONNS connections, $ROUNDS rounds alternating (answered failed p50 p90 p99 p99.9 max ms, answered/s, server us/req)"
  for r in $(seq 1 "$ROUNDS"); do
    NG[r]=$(run_fixed "http://127.0.0.1:$NGPORT" "$list" "$(ng_pids)")
    MP[r]=$(run_fixed "http://127.0.0.1:$MPPORT" "$list" "$MPPID")
    echo "round $r  nginx: ${NG[r]}   mediaproxy: ${MP[r]}"
  done
  python3 - "$label" "${NG[@]}" -- "${MP[@]}" <<'PY'
import statistics, sys
label = sys.argv[1]; args = sys.argv[2:]; i = args.index("--")
ng = [list(map(float, a.split())) for a in args[:i]]; mp = [list(map(float, a.split())) for a in args[i+1:]]
med = lambda rows, i: statistics.median(r[i] for r in rows)
cols = (("p50", 2), ("p90", 3), ("p99", 4), ("p99.9", 5))
print(f"{label} at a fixed rate, medians: " + ", ".join(
    f"{name} nginx {med(ng, c):.3f} ms mediaproxy {med(mp, c):.3f} ms ({med(mp, c) / max(med(ng, c), 1e-9):.2f}x)" for name, c in cols)
    + f"; server CPU {med(ng, 8):.1f} vs {med(mp, 8):.1f} us/req")
if any(r[1] for r in ng + mp):
    print(f"{label}  WARNING: failed requests at the fixed rate")
PY
}

# run_fixed URL LIST PIDS → rate-load's line, then the server's CPU microseconds per request (of the
# processes alive before and after: nginx's cache loader exits a minute after start)
run_fixed() {
  python3 - "$RATELOAD" "$1" "$W/$2.txt" "$FIXED_RATE" "$FIXED_DURATION" "$CONNS" "$3" <<'PY'
import os, subprocess, sys
bin, url, paths, rate, secs, conns, pids = sys.argv[1:8]
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    out = {}
    for p in pids.split():
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            out[p] = int(f[11]) + int(f[12])
        except FileNotFoundError:
            pass
    return out
c0 = cpu()
line = subprocess.run(["taskset", "-c", "1", bin, url, paths, rate, secs, conns],
                      capture_output=True, text=True, check=True, timeout=float(secs) + 30).stdout.strip()
c1 = cpu()
used = sum(c1[p] - c0[p] for p in c0.keys() & c1.keys()) / tick
print(f"{line} {used * 1e6 / max(1, int(line.split()[0])):.1f}")
PY
}

summarize() {
  python3 - "$@" <<'PY'
import statistics, sys
label = sys.argv[1]; args = sys.argv[2:]; i = args.index("--")
ng = [list(map(float, a.split())) for a in args[:i]]; mp = [list(map(float, a.split())) for a in args[i+1:]]
med = lambda rows, i: statistics.median(r[i] for r in rows)
best = lambda rows: max(rows, key=lambda r: r[0])
n, m = best(ng), best(mp)
print(f"{label}  median: nginx {med(ng,0):.0f} req/s p99 {med(ng,2):.2f} ms {med(ng,3):.1f} us/req | mediaproxy {med(mp,0):.0f} req/s p99 {med(mp,2):.2f} ms {med(mp,3):.1f} us/req"
      f" | ratio req/s {med(mp,0)/med(ng,0):.2f}x, p99 {med(mp,2)/med(ng,2):.2f}x, CPU/req {med(mp,3)/med(ng,3):.2f}x")
print(f"{label}  best:   nginx {n[0]:.0f} req/s p99 {n[2]:.2f} ms | mediaproxy {m[0]:.0f} req/s p99 {m[2]:.2f} ms"
      f" | ratio req/s {m[0]/n[0]:.2f}x, p99 {m[2]/n[2]:.2f}x")
# Each round's two runs share its conditions (how full the cache's filesystem is, what the VM's neighbours
# do), so the median of the rounds' own ratios is the steadier comparison when those drift.
paired = lambda i: statistics.median(b[i] / a[i] for a, b in zip(ng, mp))
ratios = lambda i: " ".join(f"{b[i] / a[i]:.2f}" for a, b in zip(ng, mp))
print(f"{label}  paired: median of the rounds' ratios: req/s {paired(0):.2f}x, p99 {paired(2):.2f}x, CPU/req {paired(3):.2f}x"
      f" (CPU/req by round: {ratios(3)})")
capped = [who for who, rows in (("nginx", ng), ("mediaproxy", mp)) if max(r[4] for r in rows) >= 95]
if capped:
    print(f"{label}  NOTE: wrk at >= 95 % CPU against {' and '.join(capped)}: that req/s is the client's limit, compare CPU/req")
PY
}

# warm LIST PORT: every key once over one keep-alive connection; prints the (status, X-Cache) tally
warm() {
  python3 - "$W/$1.txt" "$2" <<'PY'
import collections, http.client, sys
paths = [l.strip() for l in open(sys.argv[1])]
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[2]))
tally = collections.Counter()
for p in paths:
    c.request("GET", p); r = c.getresponse(); r.read()
    tally[f"{r.status} {r.getheader('X-Cache')}"] += 1
print(dict(tally))
PY
}

echo "== sanity: same bytes from both"
P1=$(head -1 "$W/paths.txt")
cmp <(curl -sf "http://127.0.0.1:$NGPORT$P1") <(curl -sf "http://127.0.0.1:$MPPORT$P1")
curl -sf "http://127.0.0.1:$MPPORT$P1" -o /dev/null -D - | grep -i '^x-cache'

echo "== local hits, $FILES files of 30-80 KB: wrk -t1 -c$CONNS -d$DURATION, $ROUNDS rounds alternating"
compare "local hits" paths

echo "== cache hits, $HIT_KEYS keys of 30-80 KB from the bucket, warmed once through each"
echo "warm:        nginx $(warm hit-paths "$NGPORT")   mediaproxy $(warm hit-paths "$MPPORT")"
echo "second pass: nginx $(warm hit-paths "$NGPORT")   mediaproxy $(warm hit-paths "$MPPORT")"
compare "cache hits" hit-paths
echo "mediaproxy peak RSS so far: $(hwm_kib "$MPPID") KiB"

echo "== cold misses: $MISS_KEYS distinct keys each, once, sequential keep-alive GETs from the same bucket"
python3 - "$W" "$S3PORT" "$NGPORT" "$MPPORT" "$(ng_pids)" "$MPPID" <<'PY'
import http.client, os, statistics, sys, time
w, s3, ng, mp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def run(who, port, prefix):
    paths = [l.strip() for l in open(f"{w}/miss-{who}.txt")]
    c = http.client.HTTPConnection("127.0.0.1", port)
    lat = []
    for p in paths:
        t = time.perf_counter(); c.request("GET", prefix + p); r = c.getresponse(); r.read()
        lat.append((time.perf_counter() - t) * 1000)
        assert r.status == 200, (who, r.status)
    lat.sort()
    return statistics.median(lat), lat[max(0, int(len(lat) * 0.99) - 1)], len(lat) / (sum(lat) / 1000)
tick = os.sysconf("SC_CLK_TCK")
def cpu(pids):
    return sum(int(f[11]) + int(f[12]) for f in (open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split() for p in pids)) / tick
def measured(who, port, prefix, pids):
    c0 = cpu(pids); r = run(who, port, prefix); return r + ((cpu(pids) - c0) * 1e6 / len(r_keys(who)),)
def r_keys(who):
    return open(f"{w}/miss-{who}.txt").readlines()
d = run("direct", s3, "/media")
n = measured("nginx", ng, "", sys.argv[5].split()); m = measured("mediaproxy", mp, "", sys.argv[6].split())
print(f"cold miss   p50/p99 ms: direct bucket {d[0]:.2f}/{d[1]:.2f} | nginx {n[0]:.2f}/{n[1]:.2f} | mediaproxy {m[0]:.2f}/{m[1]:.2f}")
print(f"cold miss   server CPU per miss (sequential): nginx {n[3]:.0f} us | mediaproxy {m[3]:.0f} us ({m[3]/n[3]:.2f}x)")
print(f"cold miss   added at p50 over a direct bucket GET: nginx {n[0]-d[0]:+.2f} ms, mediaproxy {m[0]-d[0]:+.2f} ms;"
      f" sequential rate mediaproxy {m[2]:.0f} req/s vs nginx {n[2]:.0f} req/s ({m[2]/n[2]:.2f}x)")
PY

echo "== cold misses, concurrent: wrk -c$CONNS -d$COLD_DURATION, $ROUNDS rounds alternating, each over $COLD_KEYS keys never asked before (every request a miss)"
NGC=(); MPC=()
for r in $(seq 1 "$ROUNDS"); do
  NGC[r]=$(DURATION=$COLD_DURATION run_wrk "http://127.0.0.1:$NGPORT" "conc-nginx-$r" "$(ng_pids)")
  MPC[r]=$(DURATION=$COLD_DURATION run_wrk "http://127.0.0.1:$MPPORT" "conc-mediaproxy-$r" "$MPPID")
  echo "round $r  nginx: ${NGC[r]}   mediaproxy: ${MPC[r]}   (req/s p50_ms p99_ms server_cpu_us/req client_cpu_%)"
done
summarize "cold misses" "${NGC[@]}" -- "${MPC[@]}"
# The profile runs on keys of its own (perf's sampling must not count in the numbers above).
[ -n "$PROFILE" ] && DURATION=$COLD_DURATION profiled cold-misses run_wrk "http://127.0.0.1:$MPPORT" conc-profile "$MPPID" >/dev/null

echo "== 8 clients streaming a 50 MiB object at once (first pass fills the caches, second pass hits)"
busy_clients=()
for pass in cold warm; do
  for who in nginx mediaproxy; do
    p=$NGPORT; [ "$who" = mediaproxy ] && p=$MPPORT
    spids=$MPPID; [ "$who" = nginx ] && spids=$(ng_pids)
    c0=$(cpu_ticks $spids)
    k0=$(children_ticks)
    start=$(date +%s.%N)
    cpids=()
    # On the client core, like wrk: unpinned, the curls took turns on the server's core too.
    for _ in $(seq 1 8); do taskset -c 1 curl -sf -o /dev/null "http://127.0.0.1:$p/$VIDKEY" & cpids+=($!); done
    wait "${cpids[@]}"
    end=$(date +%s.%N)
    c1=$(cpu_ticks $spids)
    k1=$(children_ticks)
    client=$(python3 -c "print(round(($k1-$k0)*100/$(getconf CLK_TCK)/($end-$start)))")
    python3 -c "print(f'stream 8x50 {\"$pass\":4} {\"$who\":10}: {$end-$start:.2f} s = {400/($end-$start):.0f} MiB/s, server CPU {($c1-$c0)*1e6/$(getconf CLK_TCK)/400:.0f} us per MiB, clients {$client} % of their core')"
    if [ "$client" -ge 95 ]; then busy_clients+=("$pass $who"); fi
  done
done
if [ ${#busy_clients[@]} -gt 0 ]; then
  echo "stream 8x50 NOTE: the curls at >= 95 % of their core against ${busy_clients[*]}: that MiB/s is the clients' limit, compare CPU per MiB"
fi
echo "mediaproxy peak RSS after 8 streams: $(hwm_kib "$MPPID") KiB; nginx worker $(hwm_kib "$NGWORKER") KiB"

echo "== ${BIG_MB} MiB object streamed through from the bucket (a fresh mediaproxy process), filling both caches"
kill "$MPPID"; wait "$MPPID" 2>/dev/null || true
start_mediaproxy
before=$(hwm_kib "$MPPID")
mp_t=$(taskset -c 1 curl -sf -o /dev/null -w '%{time_total} %{size_download}' "http://127.0.0.1:$MPPORT/$BIGKEY")
after=$(hwm_kib "$MPPID")
ng_before=$(hwm_kib "$NGWORKER")
ng_t=$(taskset -c 1 curl -sf -o /dev/null -w '%{time_total} %{size_download}' "http://127.0.0.1:$NGPORT/$BIGKEY")
ng_after=$(hwm_kib "$NGWORKER")
direct_t=$(taskset -c 1 curl -sf -o /dev/null -w '%{time_total} %{size_download}' "http://127.0.0.1:$S3PORT/media/$BIGKEY")
python3 - "$mp_t" "$ng_t" "$direct_t" "$before" "$after" "$ng_before" "$ng_after" <<'PY'
import sys
mp, ng, d = (list(map(float, a.split())) for a in sys.argv[1:4])
before, after, ngb, nga = map(int, sys.argv[4:8])
mib = lambda r: r[1] / r[0] / 2**20
print(f"stream      direct bucket {mib(d):.0f} MiB/s | nginx {mib(ng):.0f} MiB/s | mediaproxy {mib(mp):.0f} MiB/s ({mib(mp)/mib(ng):.2f}x nginx)")
print(f"peak RSS    mediaproxy {before/1024:.1f} MiB before, {after/1024:.1f} MiB after {mp[1]/2**20:.0f} MiB streamed"
      f" | nginx worker {ngb/1024:.1f} -> {nga/1024:.1f} MiB")
PY

echo "== start-up with $INDEX_ENTRIES cache entries on disk"
kill "$MPPID"; wait "$MPPID" 2>/dev/null || true
python3 - "$W/cache" "$INDEX_ENTRIES" <<'PY'
import hashlib, os, sys
root, n = sys.argv[1], int(sys.argv[2])
# Empty placeholder entries: the index load reads names and sizes only (a lookup would reject them).
made = set()
for i in range(n):
    h = hashlib.sha256(b"bench/%d" % i).hexdigest()[:32]
    d = os.path.join(root, "v2", h[:2], h[2:3])  # the layout of a cache this release made
    if d not in made:
        os.makedirs(d, exist_ok=True); made.add(d)
    os.close(os.open(os.path.join(d, h), os.O_CREAT | os.O_WRONLY, 0o644))
PY
sync
t0=$(date +%s.%N)
start_mediaproxy info
curl -sf -o /dev/null "http://127.0.0.1:$MPPORT$P1"
t1=$(date +%s.%N)
for _ in $(seq 1 1200); do grep -q "cache index loaded" "$W/mp.log" && break; sleep 0.1; done
t2=$(date +%s.%N)
python3 -c "print(f'index       first response {($t1-$t0)*1000:.0f} ms after start; index of $INDEX_ENTRIES entries loaded {$t2-$t0:.1f} s after start')"
echo "index       mediaproxy RSS with the index loaded: $(awk '/VmRSS/ {print $2}' "/proc/$MPPID/status") KiB (peak $(hwm_kib "$MPPID") KiB)"
