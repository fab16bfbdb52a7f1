#!/usr/bin/env python3
"""A minimal diffusiond client in Python with jeepney (pure Python, no libdbus).

    pip install -r examples/requirements.txt
    python3 examples/generate.py "a yellow triangle on a black background" triangle.png [WIDTH HEIGHT]

Uses the session bus (DBUS_SESSION_BUS_ADDRESS). Calls Manager.Generate, then Job.Wait on the
same connection (the daemon cancels the jobs of callers that leave the bus), writes the PNG
and prints its path. The API is in docs/dbus-api.md.
"""

import sys

from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call
from jeepney.io.blocking import open_dbus_connection

SERVICE = "io.github.Diffusiond1"
MANAGER = DBusAddress(
    "/io/github/Diffusiond1", bus_name=SERVICE, interface="io.github.Diffusiond1.Manager"
)
ERROR_PREFIX = "io.github.Diffusiond1.Error."


class DaemonError(Exception):
    """A D-Bus error reply, shown as 'Name: message'."""


def call(conn, msg):
    """Sends a method call and returns the reply body; no timeout (Wait may take minutes)."""
    reply = conn.send_and_get_reply(msg, timeout=None)
    if reply.header.message_type == MessageType.error:
        name = reply.header.fields.get(HeaderFields.error_name, "error")
        text = reply.body[0] if reply.body else ""
        raise DaemonError(f"{name.removeprefix(ERROR_PREFIX)}: {text}")
    return reply.body


def main(argv):
    if len(argv) not in (3, 5):
        print("usage: generate.py PROMPT OUTPUT.png [WIDTH HEIGHT]", file=sys.stderr)
        return 2
    prompt, output = argv[1], argv[2]
    # Only the keys we set; the daemon fills in the rest. Values are (signature, value).
    request = {"prompt": ("s", prompt)}
    if len(argv) == 5:
        request["width"] = ("u", int(argv[3]))
        request["height"] = ("u", int(argv[4]))

    with open_dbus_connection(bus="SESSION") as conn:
        (job_path,) = call(conn, new_method_call(MANAGER, "Generate", "a{sv}", (request,)))
        job = DBusAddress(job_path, bus_name=SERVICE, interface="io.github.Diffusiond1.Job")
        (result,) = call(conn, new_method_call(job, "Wait"))

    # result is a{sv}: each value is (signature, value); images is aay -> list of bytes.
    _, images = result["images"]
    if not images:
        raise DaemonError("the result has no images")
    with open(output, "wb") as f:
        f.write(images[0])
    print(output)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (DaemonError, OSError, ValueError, KeyError) as e:
        print(f"generate.py: {e}", file=sys.stderr)
        sys.exit(1)
