#!/usr/bin/env bash
# `mediaproxy migrate` against `rclone copy`, side by side in one run, between the same two S3 servers
# (release builds of s3s-fs with SigV4, TCP_NODELAY), at the same concurrency, repeated back to back.
# Prints objects/s, MiB/s, the tool's CPU seconds and peak RSS, and the S3 servers' CPU seconds; every
# copy is verified afterwards (`mediaproxy verify --against`). Then `migrate --mastodon-db --dry-run`
# over ROWS synthetic media rows in a throwaway PostgreSQL: keys/s and RSS.
#
#   bash benches/migrate-vs-rclone.sh
#   SMALL=2000 BIG_MB=1024 N=16 REPS=2 ROWS=1000000 bash benches/migrate-vs-rclone.sh
#
# Everything shares the machine's 2 cores; buckets live in /dev/shm (they stand for remote ones). All
# servers bind 127.0.0.1; every load is bounded by the object count.
set -euo pipefail
cd "$(dirname "$0")/.."

SMALL=${SMALL:-2000}
BIG_MB=${BIG_MB:-1024}
N=${N:-16}
REPS=${REPS:-2}
ROWS=${ROWS:-1000000}
AK=AKIABENCHMIGRATE
SK=bench-secret-not-a-real-one

need=()
command -v rclone >/dev/null || need+=(rclone)
[ -x /usr/bin/time ] || need+=(time)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked --bin mediaproxy --example s3-server 2>&1 | tail -1
BIN=$PWD/target/release/mediaproxy
S3BIN=$PWD/target/release/examples/s3-server

W=$(mktemp -d /tmp/mediaproxy-migrate.XXXXXX)
B=$(mktemp -d /dev/shm/mediaproxy-migrate.XXXXXX)
PG=""
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "$PG" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -m immediate -D "$PG/data" stop >/dev/null 2>&1 || true
  sleep 0.3
  rm -rf "$W" "$B" "$PG"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
cpu_s() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }

echo "== data: $SMALL objects of 30-80 KB, and ${BIG_MB} MiB of 20-50 MB objects"
mkdir -p "$B/src/small" "$B/src/big" "$B/dst"
python3 - "$B/src" "$SMALL" "$BIG_MB" <<'PY'
import os, random, sys
root, small, big_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(11)
for i in range(small):
    p = os.path.join(root, "small", "media_attachments/files/%03d/%03d/original/%d.jpg" % (i // 1000, i % 1000, i))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f: f.write(os.urandom(rnd.randint(30_000, 80_000)))
left, i = big_mb << 20, 0
while left > 0:
    n = min(left, rnd.randint(20_000_000, 50_000_000))
    p = os.path.join(root, "big", "media_attachments/files/900/000/%03d/original/%d.mp4" % (i, i))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f: f.write(os.urandom(n))
    left -= n; i += 1
PY

SRCPORT=$(port); DSTPORT=$(port)
"$S3BIN" "$B/src" "$SRCPORT" "$AK" "$SK" & SRCPID=$!; pids+=($SRCPID)
"$S3BIN" "$B/dst" "$DSTPORT" "$AK" "$SK" & DSTPID=$!; pids+=($DSTPID)
wait_port "$SRCPORT"; wait_port "$DSTPORT"

export RCLONE_CONFIG_SRC_TYPE=s3 RCLONE_CONFIG_SRC_PROVIDER=Other RCLONE_CONFIG_SRC_ENDPOINT="http://127.0.0.1:$SRCPORT"
export RCLONE_CONFIG_SRC_ACCESS_KEY_ID=$AK RCLONE_CONFIG_SRC_SECRET_ACCESS_KEY=$SK RCLONE_CONFIG_SRC_FORCE_PATH_STYLE=true
export RCLONE_CONFIG_DST_TYPE=s3 RCLONE_CONFIG_DST_PROVIDER=Other RCLONE_CONFIG_DST_ENDPOINT="http://127.0.0.1:$DSTPORT"
export RCLONE_CONFIG_DST_ACCESS_KEY_ID=$AK RCLONE_CONFIG_DST_SECRET_ACCESS_KEY=$SK RCLONE_CONFIG_DST_FORCE_PATH_STYLE=true

config() { # SRC_BUCKET DST_BUCKET
  cat > "$W/mp.toml" <<EOF
[local]
roots = []
[cache]
dir = "$W/cache"
[[upstream]]
name = "src"
type = "s3"
endpoint = "http://127.0.0.1:$SRCPORT"
bucket = "$1"
access_key_id = "$AK"
secret_access_key = "$SK"
[[upstream]]
name = "dst"
type = "s3"
endpoint = "http://127.0.0.1:$DSTPORT"
bucket = "$2"
access_key_id = "$AK"
secret_access_key = "$SK"
EOF
}

: > "$W/results"
run() { # TOOL SET REP
  local tool=$1 set=$2 rep=$3 bucket="$1-$2-$3"
  mkdir -p "$B/dst/$bucket"
  config "$set" "$bucket"
  local s0 d0; s0=$(cpu_s "$SRCPID"); d0=$(cpu_s "$DSTPID")
  local t0; t0=$(date +%s.%N)
  if [ "$tool" = rclone ]; then
    # AWS_CA_BUNDLE (set on some machines) makes rclone 1.60 refuse its own HTTP transport.
    env -u AWS_CA_BUNDLE /usr/bin/time -f "%e %U %S %M" -o "$W/time" rclone copy "src:$set" "dst:$bucket" --transfers "$N" --checkers "$N" -q
  else
    /usr/bin/time -f "%e %U %S %M" -o "$W/time" "$BIN" migrate --config "$W/mp.toml" --from src --to dst --concurrency "$N" > "$W/out" 2> "$W/err"
  fi
  local t1; t1=$(date +%s.%N)
  local objs bytes
  objs=$(find "$B/dst/$bucket" -type f ! -name '.*' ! -path '*/.*' | wc -l)
  bytes=$(find "$B/dst/$bucket" -type f ! -name '.*' ! -path '*/.*' -printf '%s\n' | awk '{s+=$1} END {print s+0}')
  config "$set" "$bucket"
  "$BIN" verify --config "$W/mp.toml" --upstream dst --against src > "$W/verify" 2>&1 || { echo "VERIFY FAILED for $tool $set:"; tail -3 "$W/verify"; }
  read -r _ user sys rss < "$W/time"
  python3 - "$tool" "$set" "$rep" "$t0" "$t1" "$objs" "$bytes" "$user" "$sys" "$rss" "$(cpu_s "$SRCPID")" "$s0" "$(cpu_s "$DSTPID")" "$d0" "$(tail -1 "$W/verify")" <<'PY' | tee -a "$W/results"
import sys
tool, set_, rep, t0, t1, objs, bytes_, user, sys_, rss, s1, s0, d1, d0, verify = sys.argv[1:]
secs = float(t1) - float(t0)
print(f"{tool:10} {set_:5} rep {rep}: {int(objs)/secs:7.1f} obj/s {int(bytes_)/secs/2**20:7.1f} MiB/s  tool CPU {float(user)+float(sys_):6.2f} s  peak RSS {int(rss)/1024:6.1f} MiB  "
      f"S3 CPU src {float(s1)-float(s0):5.2f} s dst {float(d1)-float(d0):5.2f} s  ({objs} objects, {secs:.1f} s; verify: {verify.split(' in ')[0]})")
PY
}

for set in small big; do
  echo "== $set: rclone copy --transfers $N --checkers $N vs mediaproxy migrate --concurrency $N, $REPS rounds alternating"
  for rep in $(seq 1 "$REPS"); do
    run rclone "$set" "$rep"
    run mediaproxy "$set" "$rep"
  done
done
python3 - "$W/results" <<'PY'
import re, statistics, sys
rows = [l for l in open(sys.argv[1]) if "obj/s" in l]
def col(tool, set_, rx):
    return [float(re.search(rx, l).group(1)) for l in rows if l.split()[0] == tool and l.split()[1] == set_]
for set_, rx, unit in (("small", r"([\d.]+) obj/s", "obj/s"), ("big", r"([\d.]+) MiB/s", "MiB/s")):
    m, r = col("mediaproxy", set_, rx), col("rclone", set_, rx)
    print(f"{set_}: mediaproxy {statistics.median(m):.1f} {unit} (spread {min(m):.1f}-{max(m):.1f}) vs rclone {statistics.median(r):.1f} "
          f"(spread {min(r):.1f}-{max(r):.1f}) = {statistics.median(m)/statistics.median(r):.2f}x")
PY

echo "== migrate --mastodon-db --dry-run over $ROWS synthetic media rows (one key each: audio, no derived style)"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
PG=$(mktemp -d /tmp/mediaproxy-pg.XXXXXX); chown postgres:postgres "$PG"
PGPORT=$(port)
runuser -u postgres -- "$PGBIN/initdb" -A trust -U postgres --no-sync -D "$PG/data" >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -w -D "$PG/data" -o "-p $PGPORT -k $PG -c listen_addresses=127.0.0.1 -c fsync=off" -l "$PG/log" start >/dev/null
psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -c "CREATE TABLE media_attachments (id bigint PRIMARY KEY, file_file_name varchar, file_content_type varchar, remote_url varchar NOT NULL DEFAULT '');
  INSERT INTO media_attachments SELECT 109000000000000000 + g, 'a' || g || '.mp3', 'audio/mpeg', '' FROM generate_series(1, $ROWS) g;"
config small "mediaproxy-small-1"
/usr/bin/time -f "%e %U %S %M" -o "$W/time" "$BIN" migrate --config "$W/mp.toml" --from src --to dst --concurrency 64 --dry-run \
  --mastodon-db "postgres://postgres@127.0.0.1:$PGPORT/postgres" > "$W/dry" 2> "$W/dry.err" || true
read -r secs user sys rss < "$W/time"
echo "dry-run: $(tail -1 "$W/dry" | cut -c1-60) ... $(python3 -c "print(f'{$ROWS/$secs:.0f} keys/s, {$secs:.1f} s, CPU {$user+$sys:.1f} s, peak RSS {$rss/1024:.1f} MiB')")"
