"""vantage6 4's `client.vpn` calls, answered by the fedmesh node agent.

vantage6 5 removed `client.vpn` together with the VPN. An algorithm that used it keeps its code:

    from fedmesh_v6 import VPN
    vpn = VPN()                      # instead of client.vpn
    for peer in vpn.get_sibling_addresses():
        print(peer["ip"], peer["port"], peer["organization_id"])

Same method names, arguments and return values as vantage6-algorithm-tools 4.15.2
(`vantage6/algorithm/client/__init__.py`, class `VPN`): every method returns a list of
`{ip, port, label, organization_id, task_id, parent_id}` (the parent and own address too), or
`{"message": "Obtaining VPN addresses failed!"}` when the agent refuses. The request is vantage6's:
`GET {HOST}:{PORT}{API_PATH}/vpn/algorithm/addresses`, flags sent as `=1` only when true, the
container token as `Authorization: Bearer` (from `CONTAINER_TOKEN`, or the file `TOKEN_FILE`
names). Standard library only.
"""
import json
import os
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["VPN", "get_addresses", "get_parent_address", "get_child_addresses",
           "get_sibling_addresses", "get_own_address"]

_FAILED = {"message": "Obtaining VPN addresses failed!"}
_FLAGS = ("only_children", "only_parent", "only_siblings", "only_self",
          "include_children", "include_parent")


def _token():
    if os.environ.get("CONTAINER_TOKEN"):
        return os.environ["CONTAINER_TOKEN"]
    if os.environ.get("TOKEN_FILE"):
        with open(os.environ["TOKEN_FILE"]) as f:
            return f.read().strip()
    return None


class VPN:
    """`client.vpn` of vantage6 4, over the fedmesh agent's address API."""

    def __init__(self, host=None, port=None, api_path=None, token=None, timeout=10):
        self.host = host or os.environ["HOST"]
        self.port = port or os.environ["PORT"]
        self.api_path = api_path if api_path is not None else os.environ.get("API_PATH", "")
        self.token = token or _token()
        self.timeout = timeout

    def get_addresses(self, only_children=False, only_parent=False, only_siblings=False,
                      only_self=False, include_children=False, include_parent=False,
                      label=None):
        args = dict(only_children=only_children, only_parent=only_parent,
                    only_siblings=only_siblings, only_self=only_self,
                    include_children=include_children, include_parent=include_parent)
        query = {name: 1 for name in _FLAGS if args[name]}
        if label:
            query["label"] = label
        url = "{}:{}{}/vpn/algorithm/addresses".format(self.host, self.port, self.api_path)
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": "Bearer " + self.token} if self.token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=self.timeout) as response:
                results = json.load(response)
        except urllib.error.HTTPError as e:
            try:
                results = json.load(e)
            except ValueError:
                results = {}
        if "addresses" not in results:
            return dict(_FAILED)
        return results["addresses"]

    def get_parent_address(self):
        return self.get_addresses(only_parent=True)

    def get_child_addresses(self):
        return self.get_addresses(only_children=True)

    def get_sibling_addresses(self):
        return self.get_addresses(only_siblings=True)

    def get_own_address(self):
        return self.get_addresses(only_self=True)


def get_addresses(**flags):
    return VPN().get_addresses(**flags)


def get_parent_address():
    return VPN().get_parent_address()


def get_child_addresses():
    return VPN().get_child_addresses()


def get_sibling_addresses():
    return VPN().get_sibling_addresses()


def get_own_address():
    return VPN().get_own_address()


if __name__ == "__main__":
    print(json.dumps(VPN().get_addresses(), indent=1))
