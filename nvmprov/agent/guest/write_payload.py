"""Write MARKER + SIZE random bytes to PATH, make it durable, read it back. Prints one JSON object.

argv: PATH MARKER SIZE_BYTES
The marker sits at offset 0 of the file, so it starts a filesystem block and the host can find
it in the backing volume. fsync of the file and its directory, then sync of every filesystem.
"""

import hashlib
import json
import os
import sys

CHUNK_BYTES = 1 << 20


def durable_write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    os.sync()


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    path, marker, size = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
    data = marker + os.urandom(size)
    durable_write(path, data)
    json.dump(
        {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "sha256_read": sha256_of(path)},
        sys.stdout,
    )


if __name__ == "__main__":
    main()
