#!/usr/bin/env bash
# A minimal diffusiond client in shell, with busctl (systemd) and python3.
#
#   examples/generate.sh "a yellow triangle on a black background" triangle.png [WIDTH HEIGHT]
#
# Uses the session bus: $DBUS_SESSION_BUS_ADDRESS, or busctl's --user bus when unset.
# Calls Manager.Generate, then Job.Wait, and writes the first PNG; prints its path.
#
# Why busctl: `busctl --json=short` prints the Wait() result as JSON, so the PNG (an `ay`,
# a byte array) comes back as a list of numbers that three lines of python3 turn into the
# file. (gdbus prints GVariant text, which needs a real parser to decode.)
# The API is in docs/dbus-api.md.
#
# Each busctl call is its own bus connection, and the daemon cancels the jobs of callers
# that leave the bus; so the request sets cancel_on_disconnect=false, and Wait() (same
# Unix user) collects the job from a second connection.
set -euo pipefail

if [ $# -ne 2 ] && [ $# -ne 4 ]; then
  echo "usage: $0 PROMPT OUTPUT.png [WIDTH HEIGHT]" >&2
  exit 2
fi
prompt=$1 output=$2

if [ -n "${DBUS_SESSION_BUS_ADDRESS:-}" ]; then
  bus=(--address="$DBUS_SESSION_BUS_ADDRESS")
else
  bus=(--user)
fi
service=io.github.Diffusiond1

# The request is an a{sv}: the number of entries, then KEY TYPE VALUE for each.
# Only the keys we set; the daemon fills in the rest.
request=(2 prompt s "$prompt" cancel_on_disconnect b false)
if [ $# -eq 4 ]; then
  request=(4 prompt s "$prompt" cancel_on_disconnect b false width u "$3" height u "$4")
fi

# Reply: o "/io/github/Diffusiond1/job/N"
reply=$(busctl "${bus[@]}" call "$service" /io/github/Diffusiond1 \
  io.github.Diffusiond1.Manager Generate 'a{sv}' "${request[@]}")
job=${reply#o \"}
job=${job%\"}

# Wait() replies when the job ends, which may take minutes: no short timeout.
result=$(mktemp)
trap 'rm -f "$result"' EXIT
busctl "${bus[@]}" --json=short --timeout=86400 call "$service" "$job" \
  io.github.Diffusiond1.Job Wait >"$result"
python3 - "$result" "$output" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))["data"][0]  # the a{sv}: key -> {"type", "data"}
images = result["images"]["data"]  # aay: a list of lists of byte values
if not images:
    sys.exit("generate.sh: the result has no images")
with open(sys.argv[2], "wb") as f:
    f.write(bytes(images[0]))
PY
echo "$output"
