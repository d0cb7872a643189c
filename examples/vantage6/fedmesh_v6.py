"""The vantage6 peer-address calls, answered by the local fedmesh agent.

vantage6 5 removed `client.vpn`; an algorithm that used it can call this module instead (or
keep calling `GET {HOST}:{PORT}{API_PATH}/vpn/algorithm/addresses`, which the fedmesh agent
serves with the same flags and response). Standard library only.

    from fedmesh_v6 import get_addresses, get_sibling_addresses
    for peer in get_sibling_addresses(label="mpc"):
        print(peer["ip"], peer["port"], peer["organization_id"])
"""
import json
import os
import urllib.error
import urllib.parse
import urllib.request

_FLAGS = ("only_children", "only_parent", "only_siblings", "only_self",
          "include_children", "include_parent")


def _token():
    if os.environ.get("CONTAINER_TOKEN"):
        return os.environ["CONTAINER_TOKEN"]
    with open(os.environ["TOKEN_FILE"]) as f:
        return f.read().strip()


def get_addresses(only_children=False, only_parent=False, only_siblings=False, only_self=False,
                  include_children=False, include_parent=False, label=None):
    """The addresses of the runs of this task (and, with the flags, of its parent or
    subtasks), as vantage6's `AlgorithmClient.vpn.get_addresses` returned them."""
    args = dict(only_children=only_children, only_parent=only_parent,
                only_siblings=only_siblings, only_self=only_self,
                include_children=include_children, include_parent=include_parent)
    query = {name: 1 for name in _FLAGS if args[name]}
    if label is not None:
        query["label"] = label
    url = "{}:{}{}/vpn/algorithm/addresses".format(
        os.environ["HOST"], os.environ["PORT"], os.environ.get("API_PATH", ""))
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + _token()})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["addresses"]
    except urllib.error.HTTPError as e:
        return {"message": json.load(e).get("msg", "Obtaining VPN addresses failed!")}


def get_parent_address():
    """The parent task's run, or None."""
    addresses = get_addresses(only_parent=True)
    return addresses[0] if addresses else None


def get_child_addresses():
    return get_addresses(only_children=True)


def get_sibling_addresses(label=None):
    return get_addresses(only_siblings=True, label=label)


def get_own_address(label=None):
    addresses = get_addresses(only_self=True, label=label)
    return addresses[0] if addresses else None


if __name__ == "__main__":
    print(json.dumps(get_addresses(), indent=1))
