"""One party of a 3-party MPyC computation whose peers are fedmesh addresses.

Run once per organisation, all at the same time, with fedmesh's environment:
    fedmesh demo --exec 'python examples/mpyc/party.py'

Party i is the i-th organisation of FEDMESH_PARTIES and listens (if i > 0) on its real port
from FEDMESH_LISTEN; the others are reached at the address fedmesh gives for their MPyC port
(11365 + i) in FEDMESH_PEERS. MPyC itself is unmodified: it gets plain -P host:port entries.

Each party inputs a private number; all learn the sum and who holds the largest input, and
nothing else. Exits 0 on success; 3 if the parties cannot all connect within
FEDMESH_MPC_START_TIMEOUT seconds (a link that is not approved never connects); 4 if the
computation does not finish within FEDMESH_MPC_TIMEOUT seconds (a party gave up); 5 if MPyC
itself fails (a party that gave up closed its connections mid-protocol).
"""
import asyncio
import json
import os
import sys

# Party i's MPyC port at its organisation: BASE_PORT + i.
BASE_PORT = int(os.environ.get("FEDMESH_MPC_BASE_PORT", "11365"))


def mpyc_arguments():
    me = int(os.environ["FEDMESH_PARTY_INDEX"])
    parties = os.environ["FEDMESH_PARTIES"].split(",")
    collab = os.environ["FEDMESH_COLLAB"]
    peers = json.loads(os.environ["FEDMESH_PEERS"])
    listen = json.loads(os.environ.get("FEDMESH_LISTEN", "{}"))
    args = []
    for i, org in enumerate(parties):
        port = BASE_PORT + i
        if i == me:
            # Our own entry only sets the port we listen on: our real one.
            real = listen.get(str(port), f"127.0.0.1:{port}")
            args += ["-P", f":{real.rsplit(':', 1)[1]}"]
            continue
        wanted = [a for a in peers.get(f"{org}.{collab}.fedmesh", []) if a.endswith(f":{port}")]
        # No approved link means no address; MPyC will find nobody there.
        args += ["-P", wanted[0] if wanted else "127.0.0.1:9"]
    return me, args + ["-I", str(me), "--no-log"]


me, args = mpyc_arguments()
sys.argv = [sys.argv[0]] + args
from mpyc.runtime import mpc  # noqa: E402  (MPyC reads sys.argv at import)

INPUTS = [int(x) for x in os.environ.get("FEDMESH_MPC_INPUTS", "17,42,8").split(",")]
START_TIMEOUT = float(os.environ.get("FEDMESH_MPC_START_TIMEOUT", "60"))
RUN_TIMEOUT = float(os.environ.get("FEDMESH_MPC_TIMEOUT", "300"))


async def compute():
    secint = mpc.SecInt(32)
    xs = mpc.input(secint(INPUTS[me]))
    total = await mpc.output(mpc.sum(xs))
    largest = await mpc.output(mpc.argmax(xs)[0])
    print(f"party {me}: sum={total} argmax={largest}", flush=True)
    await mpc.shutdown()


async def main():
    try:
        await asyncio.wait_for(mpc.start(), START_TIMEOUT)
    except asyncio.TimeoutError:
        print(f"party {me}: could not connect to every party within {START_TIMEOUT:.0f} s "
              "(is every link approved?)", file=sys.stderr, flush=True)
        os._exit(3)
    try:
        await asyncio.wait_for(compute(), RUN_TIMEOUT)
    except asyncio.TimeoutError:
        print(f"party {me}: the computation did not finish within {RUN_TIMEOUT:.0f} s "
              "(a party gave up)", file=sys.stderr, flush=True)
        os._exit(4)


try:
    mpc.run(main())
except Exception as e:  # MPyC stops its event loop when a peer disappears mid-protocol.
    print(f"party {me}: MPyC failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(5)
