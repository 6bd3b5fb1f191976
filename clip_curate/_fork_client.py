"""Worker command of :mod:`clip_curate.fork_workers`: ask the zygote for a worker, exit with its code.

Run as a script with ``python -I -S`` (standard library only, no site-packages: ~20 ms): sends this
process's environment (Beam's control and logging addresses, pipeline options, worker id) over the
zygote's Unix socket and waits for the forked worker's exit code. If this process is killed, the zygote
sees the socket close and kills the worker.
"""
import json
import os
import socket
import struct
import sys


def main(path: str) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    body = json.dumps(dict(os.environ)).encode()
    conn.sendall(struct.pack(">I", len(body)) + body)
    data = b""
    while len(data) < 4:
        chunk = conn.recv(4 - len(data))
        if not chunk:
            print("clip-curate: the forked worker was lost (zygote closed the connection)", file=sys.stderr)
            return 1
        data += chunk
    return struct.unpack(">i", data)[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
