"""The Python side of the Workload API interop matrix: grpcio (gRPC's C core, the stack
py-spiffe and the C++, Ruby, PHP and C# clients share), with stubs built at start from
proto/spiffe/workload.proto. Commands come on stdin, one JSON line per command goes to
stdout with what the client itself decoded; tests/interop/README.md lists them.

The channel is made exactly as py-spiffe makes it, `grpc.insecure_channel("unix:PATH")`,
so the C core sends the socket path, percent-encoded, as `:authority`.
"""

import json
import os
import sys

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "..", "proto"))
HEADER = (("workload.spiffe.io", "true"),)


def load_stubs():
    sys.path.insert(0, PROTO_ROOT)
    protos, services = grpc.protos_and_services("spiffe/workload.proto")
    return protos, services


def status(err):
    return {"ok": False, "code": err.code().name, "message": err.details() or ""}


def x509_message(response):
    return {
        "ok": True,
        "svids": [
            {
                "spiffe_id": svid.spiffe_id,
                "chain_bytes": len(svid.x509_svid),
                "key_bytes": len(svid.x509_svid_key),
                "bundle_bytes": len(svid.bundle),
            }
            for svid in response.svids
        ],
    }


def main():
    endpoint = os.environ["SPIFFE_ENDPOINT_SOCKET"]
    target = endpoint.replace("unix://", "unix:", 1)
    protos, services = load_stubs()
    from google.protobuf.json_format import MessageToDict

    run_as = os.environ.get("INTEROP_RUN_AS_UID")
    if run_as:
        # The stubs are built; from here on the agent must see a caller of this uid.
        os.setgroups([])
        os.setgid(int(run_as))
        os.setuid(int(run_as))
    channel = grpc.insecure_channel(target)
    stub = services.SpiffeWorkloadAPIStub(channel)
    stream = None
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        command, args = words[0], words[1:]
        try:
            if command == "x509_open":
                stream = stub.FetchX509SVID(protos.X509SVIDRequest(), metadata=HEADER)
                answer = x509_message(next(stream))
            elif command == "x509_next":
                answer = x509_message(next(stream))
            elif command == "x509_bundles":
                first = next(stub.FetchX509Bundles(protos.X509BundlesRequest(), metadata=HEADER))
                answer = {"ok": True, "bundles": {td: len(b) for td, b in first.bundles.items()}}
            elif command == "jwt":
                request = protos.JWTSVIDRequest(
                    audience=[args[0]], spiffe_id=args[1] if len(args) > 1 else ""
                )
                response = stub.FetchJWTSVID(request, metadata=HEADER)
                answer = {
                    "ok": True,
                    "svids": [{"spiffe_id": s.spiffe_id, "token": s.svid} for s in response.svids],
                }
            elif command == "validate":
                request = protos.ValidateJWTSVIDRequest(audience=args[0], svid=args[1])
                response = stub.ValidateJWTSVID(request, metadata=HEADER)
                claims = MessageToDict(response.claims)
                aud = claims.get("aud")
                answer = {
                    "ok": True,
                    "spiffe_id": response.spiffe_id,
                    "aud": aud if isinstance(aud, list) else [aud],
                }
            elif command == "jwt_bundles":
                first = next(stub.FetchJWTBundles(protos.JWTBundlesRequest(), metadata=HEADER))
                answer = {
                    "ok": True,
                    "bundles": {
                        td: len(json.loads(jwks).get("keys", [])) for td, jwks in first.bundles.items()
                    },
                }
            elif command == "noheader":
                answer = x509_message(next(stub.FetchX509SVID(protos.X509SVIDRequest())))
            elif command == "quit":
                break
            else:
                answer = {"ok": False, "code": "CLIENT", "message": f"unknown command {command}"}
        except grpc.RpcError as err:
            answer = status(err)
        except StopIteration:
            answer = {"ok": False, "code": "EOF", "message": "the stream ended"}
        print(json.dumps(answer), flush=True)
    channel.close()


if __name__ == "__main__":
    main()
