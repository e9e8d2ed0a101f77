"""The `kubernetes` Service for pods on the real node: what kube-proxy does for that one Service.

A kubelet tells every container where the API server is through ``KUBERNETES_SERVICE_HOST`` and
``KUBERNETES_SERVICE_PORT``: the Service's ClusterIP and port 443. The testbed runs no kube-proxy
(no iptables rules on this machine), so this process listens on that address, in the network
namespace the end-to-end tests run in (``scripts/netns.sh`` puts the ClusterIP there), and copies
bytes both ways to the API server on loopback. TLS passes through untouched: the pods verify the
API server's own certificate, which names 10.96.0.1.

    python -m e2e.cluster.svcproxy --listen 10.96.0.1:443 --to 127.0.0.1:6443
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    async def connected(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))

    server = await asyncio.start_server(connected, *listen, reuse_address=True)
    print(f"forwarding {listen[0]}:{listen[1]} to {target[0]}:{target[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--to", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--state-dir", help="the cluster's state directory (names this process as its own)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.to))


if __name__ == "__main__":
    main()
