"""A libnbd workload that accounts for every request (run under /usr/bin/python3).

Usage: ``/usr/bin/python3 libnbd_workload.py URI COUNT``. It writes COUNT distinct
patterns to disjoint slots with up to 16 requests in flight, reads back every third slot
already acknowledged, and prints one JSON object:

- ``connected``: whether the handshake finished (else ``error`` says why);
- ``acked``: ``[slot, length]`` of every WRITE the server acknowledged;
- ``failed``: requests that completed with an error (libnbd fails every request in
  flight when the connection dies);
- ``pending``: requests still in flight when the script gave up (must be 0: a request
  is either answered or its connection closed, never dropped silently);
- ``corrupt``: reads that returned bytes other than what was acknowledged.

Standard library plus python3-libnbd only; it never imports the project.
"""

import json
import sys
import time

SLOT = 256 * 1024
DEADLINE_S = 60


def pattern(slot: int, length: int) -> bytes:
    stamp = slot.to_bytes(4, "big") + b"\xa5\x5a" + (slot * 7 % 251).to_bytes(2, "big")
    return (stamp * (length // len(stamp) + 1))[:length]


def length_of(slot: int) -> int:
    return 4096 * (1 + slot * 13 % 64)  # 4 KiB .. 256 KiB


def main() -> int:
    import nbd  # here, so the tests import pattern() without python3-libnbd

    uri, count = sys.argv[1], int(sys.argv[2])
    out = {"connected": False, "acked": [], "failed": [], "pending": 0, "corrupt": [], "error": ""}
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error as exc:
        out["error"] = f"connect: {exc}"
        print(json.dumps(out))
        return 0
    out["connected"] = True
    inflight = {}  # cookie -> (kind, slot, buffer)
    acked = []
    next_slot = 0
    issued = 0
    dead = False
    deadline = time.monotonic() + DEADLINE_S
    while (next_slot < count and not dead) or inflight:
        if time.monotonic() > deadline:
            break
        while not dead and next_slot < count and len(inflight) < 16:
            try:
                if issued % 3 == 2 and acked:
                    slot = acked[issued % len(acked)]
                    buf = nbd.Buffer(length_of(slot))
                    cookie = h.aio_pread(buf, slot * SLOT)
                    inflight[cookie] = ("read", slot, buf)
                else:
                    slot = next_slot
                    next_slot += 1
                    buf = nbd.Buffer.from_bytearray(bytearray(pattern(slot, length_of(slot))))
                    cookie = h.aio_pwrite(buf, slot * SLOT)
                    inflight[cookie] = ("write", slot, buf)
                issued += 1
            except nbd.Error as exc:
                dead = True
                out["error"] = f"issue: {exc}"
        try:
            h.poll(100)
        except nbd.Error as exc:
            dead = True
            out["error"] = out["error"] or f"poll: {exc}"
        for cookie, (kind, slot, buf) in list(inflight.items()):
            try:
                if not h.aio_command_completed(cookie):
                    continue
            except nbd.Error as exc:
                del inflight[cookie]
                out["failed"].append([kind, slot, str(exc)])
                continue
            del inflight[cookie]
            if kind == "write":
                acked.append(slot)
                out["acked"].append([slot, length_of(slot)])
            elif buf.to_bytearray() != pattern(slot, length_of(slot)):
                out["corrupt"].append(slot)
        if dead and inflight and h.aio_is_dead():
            # libnbd retires every command when the connection dies; a second look
            # after one more poll round settles any that are still being retired.
            time.sleep(0.01)
    out["pending"] = len(inflight)
    out["slot"] = SLOT
    if not dead:
        try:
            h.shutdown()
        except nbd.Error as exc:
            out["error"] = f"shutdown: {exc}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
