#!/usr/bin/env bash
# Lazy copy's cost to readers: cold reads of old-only objects through mediaproxy with `copy_missing` off
# and on, back to back in one run, repeated. Prints, per run, client req/s and p99 (with the spread
# across repetitions: the difference between off and on must sit inside it), the copy queue's drain
# rate (objects/s from the first read until every copy has landed), and CPU seconds of mediaproxy and of
# each S3 server.
#
#   bash benches/lazy-copy.sh                 # defaults below; override with env vars
#   OBJECTS=2000 CLIENTS=16 REPS=3 WORKERS=4 bash benches/lazy-copy.sh
#
# Set-up: two release-built s3s-fs servers with TCP_NODELAY (old: anonymous, served as an `http`
# upstream, as a public bucket; new: SigV4, the copy target, at nice 19: it stands for a remote bucket,
# whose CPU is not the machine's); mediaproxy with one tokio worker pinned to CPU 0; the client
# (Python, one keep-alive connection per thread) pinned to CPU 1; the S3 servers are not pinned. Each run gets a fresh cache and an empty new bucket. Everything binds
# 127.0.0.1; every load is bounded by the object count.
set -euo pipefail
cd "$(dirname "$0")/.."

OBJECTS=${OBJECTS:-2000}
CLIENTS=${CLIENTS:-16}
REPS=${REPS:-3}
WORKERS=${WORKERS:-4}
AK=AKIABENCHLAZYCOPY
SK=bench-secret-not-a-real-one

command -v taskset >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq util-linux >/dev/null; }
cargo build --release --locked --bin mediaproxy --example s3-server 2>&1 | tail -1
BIN=$PWD/target/release/mediaproxy
S3BIN=$PWD/target/release/examples/s3-server

W=$(mktemp -d /tmp/mediaproxy-lazycopy.XXXXXX)
# The buckets stand for remote ones: their storage is in memory, not on the disk the cache uses.
B=$(mktemp -d /dev/shm/mediaproxy-lazycopy.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  rm -rf "$W" "$B"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
cpu_s() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }

echo "== data: $OBJECTS objects of 30-80 KB in the old bucket ($W)"
mkdir -p "$B/old/media"
python3 - "$W" "$OBJECTS" "$B" <<'PY'
import os, random, sys
w, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
with open(w + "/paths.txt", "w") as paths:
    for i in range(n):
        key = "media_attachments/files/%03d/%03d/original/%016x.jpg" % (i // 1000, i % 1000, rnd.getrandbits(64))
        path = os.path.join(sys.argv[3], "old/media", key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(os.urandom(rnd.randint(30_000, 80_000)))
        paths.write("/" + key + "\n")
PY

OLDPORT=$(port)
"$S3BIN" "$B/old" "$OLDPORT" & OLDPID=$!; pids+=($OLDPID)
wait_port "$OLDPORT"

run() { # MODE REP → one line of results
  local mode=$1 rep=$2 newport mpport newpid mppid
  # Fresh directories each run, deleted only at the end: deleting hundreds of MiB just before a load
  # slows the next writes on a disk mounted with `discard` (FIELD-NOTES).
  local new="$B/new-$mode-$rep" cache="$W/cache-$mode-$rep"
  mkdir -p "$new/media" "$cache"
  newport=$(port); mpport=$(port); admin=$(port)
  # The new bucket stands for a remote one: its CPU is not ours, so it only gets what is idle.
  nice -n 19 "$S3BIN" "$new" "$newport" "$AK" "$SK" & newpid=$!; pids+=($newpid)
  wait_port "$newport"
  cat > "$W/mp.toml" <<EOF
[server]
listen = ["127.0.0.1:$mpport"]
access_log = false
admin_listen = "127.0.0.1:$admin"
[local]
roots = []
[cache]
dir = "$cache"
[copy]
workers = $WORKERS
[[upstream]]
name = "new"
type = "s3"
endpoint = "http://127.0.0.1:$newport"
bucket = "media"
access_key_id = "$AK"
secret_access_key = "$SK"
copy_missing = $([ "$mode" = on ] && echo true || echo false)
[[upstream]]
name = "old"
type = "http"
url = "http://127.0.0.1:$OLDPORT/media"
EOF
  TOKIO_WORKER_THREADS=1 MEDIAPROXY_LOG=warn taskset -c 0 "$BIN" serve --config "$W/mp.toml" 2> "$W/mp.log" & mppid=$!
  pids+=($mppid)
  wait_port "$mpport"
  local old0 new0 mp0
  old0=$(cpu_s "$OLDPID"); new0=$(cpu_s "$newpid"); mp0=$(cpu_s "$mppid")
  taskset -c 1 python3 - "$W/paths.txt" "$mpport" "$admin" "$CLIENTS" "$mode" > "$W/run.out" <<'PY'
import http.client, queue, sys, threading, time, urllib.request
paths = [l.strip() for l in open(sys.argv[1])]
port, admin, clients, mode = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
todo = queue.Queue()
for p in paths: todo.put(p)
lat, bad = [], []
lock = threading.Lock()
def worker():
    c = http.client.HTTPConnection("127.0.0.1", port)
    mine = []
    while True:
        try: p = todo.get_nowait()
        except queue.Empty: break
        t = time.perf_counter(); c.request("GET", p); r = c.getresponse(); r.read()
        mine.append((time.perf_counter() - t) * 1000)
        if r.status != 200 or r.getheader("X-Cache") != "MISS": bad.append((p, r.status))
    with lock: lat.extend(mine)
t0 = time.perf_counter()
ts = [threading.Thread(target=worker) for _ in range(clients)]
for t in ts: t.start()
for t in ts: t.join()
elapsed = time.perf_counter() - t0
lat.sort()
p99 = lat[int(len(lat) * 0.99) - 1]
drain = 0.0
if mode == "on":
    def done():
        m = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
        v = lambda name: sum(float(l.split()[-1]) for l in m.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))
        return v("mediaproxy_copy_copied_total") + v("mediaproxy_copy_skipped_total") + v("mediaproxy_copy_failed_total"), v("mediaproxy_copy_failed_total")
    deadline = time.perf_counter() + 300
    while done()[0] < len(paths) and time.perf_counter() < deadline: time.sleep(0.02)
    drain = len(paths) / (time.perf_counter() - t0)
    n, failed = done()
    if n < len(paths) or failed: print(f"WARNING: {n:.0f} copies ended, {failed:.0f} failed", file=sys.stderr)
if bad: print(f"WARNING: {len(bad)} answers not 200 MISS, e.g. {bad[0]}", file=sys.stderr)
print(f"{len(paths)/elapsed:.0f} {p99:.2f} {drain:.0f}")
PY
  local out; out=$(cat "$W/run.out")
  local copied; copied=$(find "$new/media" -type f -name '*.jpg' | wc -l)
  echo "$mode $rep $out $(cpu_s "$mppid") $mp0 $(cpu_s "$OLDPID") $old0 $(cpu_s "$newpid") $new0 $copied"
  kill "$mppid" "$newpid"; wait "$mppid" "$newpid" 2>/dev/null || true
}

echo "== $OBJECTS cold reads, $CLIENTS clients, copy_missing off then on, $REPS repetitions"
: > "$W/results"
for rep in $(seq 1 "$REPS"); do
  for mode in off on; do
    line=$(run "$mode" "$rep")
    echo "$line" >> "$W/results"
    echo "$line" | awk '{printf "rep %s copy %-3s: %6s req/s  p99 %6s ms  drain %5s obj/s  CPU s: mediaproxy %.2f, old bucket %.2f, new bucket %.2f  (objects in new: %s)\n", $2, $1, $3, $4, $5, $6-$7, $8-$9, $10-$11, $12}'
  done
done
python3 - "$W/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
def col(mode, i): return [float(r[i]) for r in rows if r[0] == mode]
for mode in ("off", "on"):
    rps, p99 = col(mode, 2), col(mode, 3)
    cpu = [float(r[5]) - float(r[6]) for r in rows if r[0] == mode]
    print(f"copy {mode:3}: req/s median {statistics.median(rps):.0f} (spread {min(rps):.0f}-{max(rps):.0f}), "
          f"p99 median {statistics.median(p99):.2f} ms (spread {min(p99):.2f}-{max(p99):.2f}), mediaproxy CPU {statistics.median(cpu):.2f} s")
on, off = col("on", 2), col("off", 2)
print(f"req/s on/off: {statistics.median(on)/statistics.median(off):.2f}x; off spread is "
      f"{(max(off)-min(off))/statistics.median(off)*100:.0f}% of its median; drain median {statistics.median(col('on', 4)):.0f} objects/s")
PY
