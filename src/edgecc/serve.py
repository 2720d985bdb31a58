"""`edgecc serve SPLIT/server --port P`: the server half of a partitioned model behind a small TCP protocol.

One exchange per request: the device sends the cut tensors, the server answers with the graph outputs it
computes. Each message is framed as a 1-byte status (`K` ok, `E` error: the payload is a UTF-8 message), an 8-byte
big-endian length and the payload (an .npz made by `partition.pack`). A connection may carry many requests.
The server compiles `server.onnx` (the half cut out with onnx-graphsurgeon) for the target in `server.json`: the
same code as the native artifacts beside it, loaded in-process. This is a loopback demo, not a hardened service:
no authentication, no encryption.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

from edgecc.errors import EdgeccError

_HEADER = struct.Struct(">cQ")
MAX_MESSAGE = 1 << 31  # refuse anything larger than 2 GiB: a corrupt or hostile length


def _read_exact(sock: socket.socket, count: int) -> bytes | None:
    chunks, left = [], count
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send_frame(sock: socket.socket, payload: bytes, status: bytes = b"K") -> None:
    sock.sendall(_HEADER.pack(status, len(payload)) + payload)


def read_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """(status, payload), or None when the peer closed the connection between frames."""
    header = _read_exact(sock, _HEADER.size)
    if header is None:
        return None
    status, length = _HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise EdgeccError(f"message of {length} bytes refused", where="edgecc serve")
    payload = _read_exact(sock, length)
    if payload is None:
        raise EdgeccError("connection closed in the middle of a message", where="edgecc serve")
    return status, payload


def parse_address(remote: str) -> tuple[str, int]:
    host, sep, port = remote.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EdgeccError(f"bad server address '{remote}'", where="remote", hint="write HOST:PORT, e.g. 127.0.0.1:8765")
    return host, int(port)


def request(remote: str, message: bytes, timeout: float = 300.0) -> bytes:
    """Send one message to `edgecc serve` at HOST:PORT and return its answer (errors come back as EdgeccError)."""
    address = parse_address(remote)
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            send_frame(sock, message)
            frame = read_frame(sock)
    except OSError as exc:
        raise EdgeccError(f"cannot reach the server half: {exc}", where=remote,
                          hint="start it with `edgecc serve SPLIT/server --port P`") from None
    if frame is None:
        raise EdgeccError("the server closed the connection without answering", where=remote)
    status, payload = frame
    if status != b"K":
        raise EdgeccError(f"the server half failed: {payload.decode(errors='replace')}", where=remote)
    return payload


def load_server(folder: str):
    """Compile the server half saved by `edgecc partition` (server.onnx + server.json)."""
    import edgecc

    meta_path, model_path = os.path.join(folder, "server.json"), os.path.join(folder, "server.onnx")
    for path in (meta_path, model_path):
        if not os.path.isfile(path):
            raise EdgeccError("not found", where=path,
                              hint="point edgecc serve at the server/ folder written by `edgecc partition -o DIR`")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        target = meta["target"]
    except (ValueError, KeyError) as exc:
        raise EdgeccError(f"unreadable server description ({exc})", where=meta_path) from None
    return edgecc.compile(model_path, target=target, name="server")


def serve(folder: str, host: str = "127.0.0.1", port: int = 0, requests: int | None = None,
          log=lambda text: print(text, flush=True)) -> None:
    """Answer requests until interrupted (or after `requests` of them). Prints the address it listens on first,
    so a caller that asked for port 0 learns the port."""
    from edgecc.partition import serve_message

    model = load_server(folder)
    with socket.create_server((host, port)) as listener:
        bound_host, bound_port = listener.getsockname()[:2]
        log(f"edgecc: serving {folder} on {bound_host}:{bound_port}")
        answered = 0
        while requests is None or answered < requests:
            connection, _ = listener.accept()
            with connection:
                while requests is None or answered < requests:
                    frame = read_frame(connection)
                    if frame is None:
                        break
                    try:
                        send_frame(connection, serve_message(model, frame[1]))
                    except EdgeccError as exc:
                        send_frame(connection, exc.one_line().encode(), b"E")
                    except Exception as exc:  # a bad message must not stop the server
                        send_frame(connection, f"{type(exc).__name__}: {exc}".encode(), b"E")
                    answered += 1
        print(f"edgecc: answered {answered} request(s)", file=sys.stderr)
