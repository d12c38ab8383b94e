#!/usr/bin/env python3
"""Real gRPC and WebSocket servers and clients for the lab's intercept tests.

gRPC (python3-grpcio, no generated code: generic handlers on raw bytes), service
`lab.Who`: `Who` (unary) answers the server's name and the caller's `x-dev` metadata;
`Count` (server streaming) answers N messages `NAME i`; `Peer` the name and the caller's
address (telling connections apart). WebSocket (python3-websockets):
an echo server that prefixes text messages with its name and returns binary messages
unchanged. h2c (python3-h2): answers every request with `NAME h1|h2 dev=X-DEV`, and
switches a connection to HTTP/2 when a request offers `Upgrade: h2c` (RFC 7540 3.2),
as Go's h2c handler and Tomcat do.

  lab_rpc.py grpc-server NAME ADDR         serve until killed
  lab_rpc.py grpc-client TARGET CALLS...   CALLS: who[:DEV], count:N[:DEV] or burst:N[:DEV] (N calls
                                           at once); all on one channel
  lab_rpc.py ws-server NAME HOST PORT      serve until killed
  lab_rpc.py ws-client URL [DEV]           two text messages and one 1 MiB binary message
  lab_rpc.py h2c-server NAME HOST PORT      HTTP/1.1 that accepts `Upgrade: h2c` (python3-h2)
  lab_rpc.py keepalive HOST PORT PATH DEV SECONDS
                                           GET PATH twice on one HTTP/1.1 connection, with
                                           x-dev: DEV, SECONDS apart; prints each status and body
"""

import asyncio
import hashlib
import sys
from concurrent import futures


def grpc_server(name, addr):
    import grpc

    def who(request, context):
        md = dict(context.invocation_metadata())
        return f"{name} dev={md.get('x-dev', '')}".encode()

    def peer(request, context):
        return f"{name} {context.peer()}".encode()

    def count(request, context):
        for i in range(int(request.decode() or "0")):
            yield f"{name} {i}".encode()

    handler = grpc.method_handlers_generic_handler(
        "lab.Who",
        {
            "Who": grpc.unary_unary_rpc_method_handler(who),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Peer": grpc.unary_unary_rpc_method_handler(peer),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(addr) == 0:
        sys.exit(f"cannot listen on {addr}")
    server.start()
    print(f"listening {addr}", flush=True)
    server.wait_for_termination()


def grpc_client(target, calls):
    import grpc

    with grpc.insecure_channel(target) as channel:
        who = channel.unary_unary("/lab.Who/Who")
        count = channel.unary_stream("/lab.Who/Count")
        peer = channel.unary_unary("/lab.Who/Peer")
        for call in calls:
            parts = call.split(":")
            dev = parts[-1] if (parts[0] == "who" and len(parts) == 2) or len(parts) == 3 else None
            md = [("x-dev", dev)] if dev else []
            if parts[0] == "who":
                print(who(b"", metadata=md, timeout=10).decode(), flush=True)
            elif parts[0] == "burst":
                # N calls at once: how many servers and connections answered them.
                futs = [peer.future(b"", metadata=md, timeout=10) for _ in range(int(parts[1]))]
                seen = {f.result().decode() for f in futs}
                names = sorted({s.rsplit(" ", 1)[0] for s in seen})
                print(f"{len(futs)} calls, {' '.join(names)}, {len(seen)} connection(s)", flush=True)
            else:
                got = [m.decode() for m in count(parts[1].encode(), metadata=md, timeout=10)]
                print(" | ".join(got), flush=True)


def ws_server(name, host, port):
    import websockets

    async def echo(ws, path=None):
        async for message in ws:
            await ws.send(message if isinstance(message, bytes) else f"{name}: {message}")

    async def main():
        async with websockets.serve(echo, host, int(port), max_size=None):
            print(f"listening {host}:{port}", flush=True)
            await asyncio.Future()

    asyncio.run(main())


def ws_client(url, dev=None):
    import websockets

    async def main():
        headers = {"x-dev": dev} if dev else {}
        async with websockets.connect(url, extra_headers=headers, max_size=None, open_timeout=10) as ws:
            for text in ["one", "two"]:
                await ws.send(text)
                print(await asyncio.wait_for(ws.recv(), 10), flush=True)
            blob = bytes(range(256)) * 4096
            await ws.send(blob)
            back = await asyncio.wait_for(ws.recv(), 10)
            same = hashlib.sha256(back).hexdigest() == hashlib.sha256(blob).hexdigest()
            print(f"binary {len(back)} {'same' if same else 'DIFFERENT'}", flush=True)

    try:
        asyncio.run(main())
    except Exception as e:  # the rejection is the answer a test looks at
        print(f"rejected: {e}", flush=True)
        sys.exit(1)


def h2c_server(name, host, port):
    import h2.config
    import h2.connection
    import h2.events

    def answer(conn, stream, headers):
        dev = dict(headers).get("x-dev", "")
        body = f"{name} h2 dev={dev}\n".encode()
        conn.send_headers(stream, [(":status", "200"), ("content-length", str(len(body)))])
        conn.send_data(stream, body, end_stream=True)

    async def as_h2(reader, writer, settings, dev):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_upgrade_connection(settings)
        answer(conn, 1, [("x-dev", dev)])  # the upgrading request is stream 1
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    answer(conn, event.stream_id, event.headers)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            writer.write(conn.data_to_send())
            await writer.drain()

    async def serve(reader, writer):
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                fields = dict((k.strip().lower(), v.strip()) for k, v in (f.split(":", 1) for f in head[1:] if ":" in f))
                dev = fields.get("x-dev", "")
                if fields.get("upgrade", "").lower() == "h2c" and "http2-settings" in fields:
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                    await as_h2(reader, writer, fields["http2-settings"], dev)
                    return
                body = f"{name} h1 dev={dev}\n".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(serve, host, int(port))
        print(f"listening {host}:{port}", flush=True)
        await server.serve_forever()

    asyncio.run(main())


def keepalive(host, port, path, dev, seconds):
    import http.client
    import time

    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    for i in range(2):
        if i:
            time.sleep(float(seconds))
        conn.request("GET", path, headers={"x-dev": dev})
        r = conn.getresponse()
        print(r.status, r.read().decode().strip(), flush=True)
    conn.close()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    commands = {
        "grpc-server": grpc_server,
        "ws-server": ws_server,
        "ws-client": ws_client,
        "h2c-server": h2c_server,
        "keepalive": keepalive,
    }
    commands.get(cmd, lambda *a: grpc_client(a[0], a[1:]))(*args)
