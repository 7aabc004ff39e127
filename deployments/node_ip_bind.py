"""Imported into every Ray worker before it runs anything (RAY_preload_python_modules,
which scripts/ray_loopback.pth sets): Serve's replicas start their inter-deployment
gRPC server on "[::]:0", every interface, whatever the node's address, and nothing in
Ray configures that. Its callers dial the replica at its node IP, so binding that
address instead keeps it reachable by all of them: 127.0.0.1 on one machine (where
Ray's own servers are on loopback), the node's address on a cluster.

Keep this module free of imports beyond Ray's: every worker of every Ray program in
this environment imports it."""
import sys

try:
    import ray._common.tls_utils as tls_utils
    _add_port = tls_utils.add_port_to_grpc_server
except (ImportError, AttributeError):   # another Ray: leave it as it is (tests/test_loopback_ports.py tells)
    tls_utils = None

_WILDCARD_EPHEMERAL = {"[::]:0", "0.0.0.0:0", ":0"}


def _add_port_on_node_ip(server, address):
    # Only ephemeral wildcard binds: a server on a fixed port (Serve's gRPC proxy, Ray
    # Client) is one the user chose to expose and stays as configured.
    if address in _WILDCARD_EPHEMERAL:
        import ray
        from ray._common.network_utils import build_address
        address = build_address(ray.util.get_node_ip_address(), 0)
    return _add_port(server, address)


if tls_utils is not None:
    tls_utils.add_port_to_grpc_server = _add_port_on_node_ip
    # Modules that imported the name before this ran keep the original; rebind theirs.
    for _name in ("ray.serve._private.replica",):
        if _name in sys.modules:
            sys.modules[_name].add_port_to_grpc_server = _add_port_on_node_ip
