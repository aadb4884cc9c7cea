"""Start Arize Phoenix with its OTLP/gRPC receiver on 127.0.0.1 only.

Phoenix binds its gRPC port on every interface ("[::]:PORT") whatever PHOENIX_HOST says; the
end-to-end test keeps all traffic on loopback, so this launcher rewrites that one address.
Run with Phoenix's own interpreter:  <phoenix venv>/bin/python phoenix_loopback.py serve
"""

import sys

import grpc.aio._server as _grpc_server

_add_insecure_port = _grpc_server.Server.add_insecure_port


def _loopback_only(self, address: str) -> int:
    if address.startswith("[::]:"):
        address = "127.0.0.1:" + address.rsplit(":", 1)[1]
    return _add_insecure_port(self, address)


_grpc_server.Server.add_insecure_port = _loopback_only

if __name__ == "__main__":
    from phoenix.server.main import main

    sys.argv[0] = "phoenix"
    sys.exit(main())
