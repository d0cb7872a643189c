"""Drives vantage6 4's own algorithm client (vantage6-algorithm-tools, unmodified) against the
fedmesh address API and prints every `client.vpn` answer as JSON; with HELPER=1, the same calls
through the fedmesh_v6 package instead.

Environment: HOST, PORT, API_PATH (as a vantage6 4 node sets them), TOKEN (the container token)
and SOURCE (the address this algorithm run connects from; on a real node the container runtime
assigns it, here the connection is bound to it).
"""
import json
import os
import socket

import urllib3.util.connection as connection


def _bound(create):
    def from_source(address, timeout=socket.getdefaulttimeout(), source_address=None, **kw):
        return create(address, timeout, (os.environ["SOURCE"], 0), **kw)
    return from_source


connection.create_connection = _bound(connection.create_connection)
socket.create_connection = _bound(socket.create_connection)

if os.environ.get("HELPER"):
    from fedmesh_v6 import VPN

    vpn = VPN(token=os.environ["TOKEN"])
else:
    from vantage6.algorithm.client import AlgorithmClient

    client = AlgorithmClient(
        token=os.environ["TOKEN"],
        host=os.environ["HOST"],
        port=int(os.environ["PORT"]),
        path=os.environ.get("API_PATH", ""),
    )
    vpn = client.vpn
FLAGS = {
    "": {},
    "only_children": {"only_children": True},
    "only_parent": {"only_parent": True},
    "only_siblings": {"only_siblings": True},
    "only_self": {"only_self": True},
    "include_children": {"include_children": True},
    "include_parent": {"include_parent": True},
    "include_children+include_parent": {"include_children": True, "include_parent": True},
    "only_children+include_children": {"only_children": True, "include_children": True},
    "only_parent+include_parent": {"only_parent": True, "include_parent": True},
    "only_children+include_parent": {"only_children": True, "include_parent": True},
    "only_parent+include_children": {"only_parent": True, "include_children": True},
    "only_siblings+include_parent": {"only_siblings": True, "include_parent": True},
    "only_self+only_siblings": {"only_self": True, "only_siblings": True},
    "label=mpc": {"label": "mpc"},
    "label=agg": {"label": "agg"},
    "label=": {"label": ""},
    "include_parent+label=agg": {"include_parent": True, "label": "agg"},
}
out = {name: vpn.get_addresses(**kw) for name, kw in FLAGS.items()}
out["get_parent_address"] = vpn.get_parent_address()
out["get_child_addresses"] = vpn.get_child_addresses()
out["get_sibling_addresses"] = vpn.get_sibling_addresses()
out["get_own_address"] = vpn.get_own_address()
print(json.dumps(out))
