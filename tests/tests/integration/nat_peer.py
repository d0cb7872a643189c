"""Helper for the rendezvous NAT test, run inside a site's network namespace.

serve PORT          accept connections on 127.0.0.1:PORT; each sends an 8-byte count N, then
                    its payload until EOF; the server sends N random bytes back meanwhile and
                    prints "recv <bytes> <sha256> sent <sha256>" when both ends are done.
send HOST PORT N M  connect (retrying for 10 s), send N random bytes, ask for M back; prints
                    "sent <sha256> recv <bytes> <sha256>".
hold HOST PORT      connect, have "ping" echoed (the server holds the connection open), print
                    "open", wait until the connection ends, print "closed".
listen PORT         accept TCP on 0.0.0.0:PORT and UDP on 0.0.0.0:PORT; print "udp" per datagram.
dial HOST PORT      exit 0 if a TCP connection to HOST:PORT opens within 2 s, else 1.
udp HOST PORT       send three UDP datagrams to HOST:PORT.
"""
import hashlib, os, socket, struct, sys, threading, time

CHUNK = 256 * 1024
HOLD = (1 << 64) - 1
out_lock = threading.Lock()


def say(line):
    with out_lock:
        print(line, flush=True)


def send_random(sock, n):
    h = hashlib.sha256()
    left = n
    while left:
        b = os.urandom(min(CHUNK, left))
        sock.sendall(b)
        h.update(b)
        left -= len(b)
    return h.hexdigest()


def recv_all(sock):
    h = hashlib.sha256()
    n = 0
    while True:
        b = sock.recv(CHUNK)
        if not b:
            return n, h.hexdigest()
        h.update(b)
        n += len(b)


def read_exact(sock, n):
    b = b""
    while len(b) < n:
        c = sock.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b


def serve_one(conn):
    try:
        (want,) = struct.unpack(">Q", read_exact(conn, 8))
        if want == HOLD:
            while True:
                b = conn.recv(CHUNK)
                if not b:
                    say("held connection ended")
                    return
                conn.sendall(b)
        result = {}
        def sender():
            result["sent"] = send_random(conn, want)
            conn.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=sender)
        t.start()
        n, digest = recv_all(conn)
        t.join()
        say(f"recv {n} {digest} sent {result.get('sent')}")
    except Exception as e:  # the hold connection ends by revocation
        say(f"ended {type(e).__name__}")
    finally:
        conn.close()


def main():
    mode = sys.argv[1]
    if mode == "serve":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(sys.argv[2])))
        s.listen(16)
        say("serving")
        while True:
            conn, _ = s.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()
    elif mode in ("send", "hold"):
        host, port = sys.argv[2], int(sys.argv[3])
        deadline = time.time() + 10
        while True:
            try:
                c = socket.create_connection((host, port), timeout=2)
                c.settimeout(None)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        if mode == "hold":
            c.sendall(struct.pack(">Q", HOLD) + b"ping")
            if read_exact(c, 4) != b"ping":
                raise SystemExit("no echo")
            say("open")
            try:
                while c.recv(CHUNK):
                    pass
            except OSError:
                pass
            say("closed")
            return
        n, m = int(sys.argv[4]), int(sys.argv[5])
        c.sendall(struct.pack(">Q", m))
        result = {}
        def receiver():
            result["recv"] = recv_all(c)
        t = threading.Thread(target=receiver)
        t.start()
        sent = send_random(c, n)
        c.shutdown(socket.SHUT_WR)
        t.join()
        rn, rd = result["recv"]
        say(f"sent {sent} recv {rn} {rd}")
    elif mode == "listen":
        port = int(sys.argv[2])
        t = socket.socket()
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind(("0.0.0.0", port))
        t.listen(16)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("0.0.0.0", port))
        def tcp():
            while True:
                conn, _ = t.accept()
                conn.close()
        threading.Thread(target=tcp, daemon=True).start()
        say("listening")
        while True:
            u.recv(2048)
            say("udp")
    elif mode == "dial":
        try:
            socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=2).close()
        except OSError:
            sys.exit(1)
    elif mode == "udp":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(3):
            u.sendto(b"hello", (sys.argv[2], int(sys.argv[3])))
            time.sleep(0.05)


if __name__ == "__main__":
    main()
