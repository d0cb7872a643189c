"""A Flower federation whose clients reach the server through fedmesh.

Run once per organisation, all at the same time, with fedmesh's environment:
    fedmesh demo --exec 'python examples/flower/federation.py'

The first organisation of FEDMESH_PARTIES runs the server on its real port (FEDMESH_LISTEN);
every other organisation runs a client that dials the server's fedmesh address from
FEDMESH_PEERS. Two rounds of FedAvg over numpy weights; Flower itself is unmodified.
"""
import json
import os
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
import flwr as fl  # noqa: E402

PORT = 8080
ROUNDS = 2
me = int(os.environ["FEDMESH_PARTY_INDEX"])
parties = os.environ["FEDMESH_PARTIES"].split(",")


def server():
    listen = json.loads(os.environ["FEDMESH_LISTEN"])[str(PORT)]
    strategy = fl.server.strategy.FedAvg(
        min_fit_clients=len(parties) - 1,
        min_evaluate_clients=len(parties) - 1,
        min_available_clients=len(parties) - 1,
    )
    history = fl.server.start_server(
        server_address=listen,
        config=fl.server.ServerConfig(num_rounds=ROUNDS, round_timeout=60),
        strategy=strategy,
    )
    rounds = [r for r, _ in history.losses_distributed]
    print(f"server: finished rounds {rounds}, losses {history.losses_distributed}", flush=True)
    sys.exit(0 if rounds == list(range(1, ROUNDS + 1)) else 1)


class Client(fl.client.NumPyClient):
    def __init__(self):
        self.w = np.zeros(4, dtype=np.float32)

    def get_parameters(self, config):
        return [self.w]

    def fit(self, parameters, config):
        # Each client nudges the model by its own amount; FedAvg averages by example count.
        return [parameters[0] + float(me)], 10 * me, {}

    def evaluate(self, parameters, config):
        return float(np.sum(parameters[0] ** 2)), 10 * me, {}


def client():
    collab = os.environ["FEDMESH_COLLAB"]
    peers = json.loads(os.environ["FEDMESH_PEERS"])
    addresses = [a for a in peers.get(f"{parties[0]}.{collab}.fedmesh", []) if a.endswith(f":{PORT}")]
    if not addresses:
        print(f"client {me}: no fedmesh address for the server (is the link approved?)", file=sys.stderr)
        sys.exit(3)
    fl.client.start_client(server_address=addresses[0], client=Client().to_client(), insecure=True)
    print(f"client {me}: done", flush=True)


server() if me == 0 else client()
