#!/usr/bin/env python3
"""Small UDP echo server and probes for the drill self-test (selftest.sh).

serve HOST PORT LOG
    Echo every datagram back to its sender. Appends "TAG SEQ" per datagram to LOG, and
    "SENDERR <error>" if echoing failed, so the test can count what arrived per probe.
probe HOST PORT COUNT [--timeout S] [--size B] [--interval S]
    Send COUNT datagrams from a *connected* UDP socket (so ICMP errors would surface as
    exceptions), wait up to --timeout after the last send for echoes, print one JSON line:
    tag, sent, send_errors, received, recv_errors, first_error, rtt_ms_median.
sample HOST PORT --duration S --interval S
    Send one datagram every --interval for --duration, then print a string with one
    character per datagram: 1 if it was echoed, 0 if not (to watch a flap).
forward LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT
    A minimal UDP forwarder (one upstream socket per client) standing in for
    tidemesh-relay in the router, to check that router faults also hit relayed traffic.

Only used inside the drill's own network namespaces.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time


def serve(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((args.host, args.port))
    with open(args.log, "a", buffering=1) as log:
        log.write("READY\n")
        while True:
            data, peer = sock.recvfrom(65535)
            head = data[:64].split(b" ")
            tag = head[0].decode(errors="replace")
            seq = head[1].decode(errors="replace") if len(head) > 1 else "?"
            log.write(f"{tag} {seq}\n")
            try:
                sock.sendto(data, peer)
            except OSError as e:
                log.write(f"SENDERR {e}\n")


def payload(tag, seq, size):
    head = f"{tag} {seq} {time.monotonic_ns()} ".encode()
    return head + b"x" * max(0, size - len(head))


def probe(args):
    tag = os.urandom(4).hex()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sent = send_errors = received = recv_errors = 0
    first_error = None
    try:
        sock.connect((args.host, args.port))
    except OSError as e:  # e.g. ENETUNREACH when the sender's own link is down
        print(json.dumps({
            "tag": tag, "sent": 0, "send_errors": args.count, "received": 0,
            "recv_errors": 0, "first_error": f"connect: {e}", "rtt_ms_median": None,
        }))
        return
    rtts = []
    seen = set()

    def take(block_until):
        nonlocal received, recv_errors, first_error
        while True:
            remaining = block_until - time.monotonic()
            if remaining <= 0 and block_until != 0:
                return
            sock.settimeout(max(remaining, 0.0) if block_until else 0.0)
            try:
                data = sock.recv(65535)
            except (socket.timeout, BlockingIOError):
                return
            except OSError as e:  # ICMP errors on a connected socket land here
                recv_errors += 1
                first_error = first_error or f"recv: {e}"
                continue
            parts = data[:80].split(b" ")
            if len(parts) >= 3 and parts[0].decode() == tag and parts[1] not in seen:
                seen.add(parts[1])
                received += 1
                rtts.append((time.monotonic_ns() - int(parts[2])) / 1e6)
                if received == args.count:
                    return

    for seq in range(args.count):
        try:
            sock.send(payload(tag, seq, args.size))
            sent += 1
        except OSError as e:
            send_errors += 1
            first_error = first_error or f"send: {e}"
        take(0)  # drain what has arrived, without blocking
        if args.interval:
            time.sleep(args.interval)
    if received < args.count:
        take(time.monotonic() + args.timeout)
    print(json.dumps({
        "tag": tag, "sent": sent, "send_errors": send_errors, "received": received,
        "recv_errors": recv_errors, "first_error": first_error,
        "rtt_ms_median": round(statistics.median(rtts), 2) if rtts else None,
    }))


def sample(args):
    tag = os.urandom(4).hex()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((args.host, args.port))
    sock.setblocking(False)
    n = int(args.duration / args.interval)
    got = set()
    errors = 0
    start = time.monotonic()
    for seq in range(n):
        try:
            sock.send(payload(tag, seq, 32))
        except OSError:
            errors += 1
        while time.monotonic() < start + (seq + 1) * args.interval:
            try:
                data = sock.recv(2048)
                parts = data.split(b" ")
                if parts[0].decode() == tag:
                    got.add(int(parts[1]))
            except BlockingIOError:
                time.sleep(0.005)
            except OSError:
                errors += 1
    print("".join("1" if s in got else "0" for s in range(n)), f"errors={errors}")


def forward(args):
    import selectors
    sel = selectors.DefaultSelector()
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind((args.host, args.port))
    sel.register(front, selectors.EVENT_READ, None)
    flows = {}
    print("READY", flush=True)
    while True:
        for key, _ in sel.select():
            sock, client = key.fileobj, key.data
            data, peer = sock.recvfrom(65535)
            if client is None:  # from a client: forward upstream on its own socket
                up = flows.get(peer)
                if up is None:
                    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    up.connect((args.upstream_host, args.upstream_port))
                    sel.register(up, selectors.EVENT_READ, peer)
                    flows[peer] = up
                try:
                    up.send(data)
                except OSError:
                    pass
            else:  # from upstream: back to the client
                try:
                    front.sendto(data, client)
                except OSError:
                    pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("log")
    s.set_defaults(fn=serve)
    s = sub.add_parser("probe")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("count", type=int)
    s.add_argument("--timeout", type=float, default=0.5)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--interval", type=float, default=0.0)
    s.set_defaults(fn=probe)
    s = sub.add_parser("sample")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("--duration", type=float, required=True)
    s.add_argument("--interval", type=float, default=0.1)
    s.set_defaults(fn=sample)
    s = sub.add_parser("forward")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("upstream_host")
    s.add_argument("upstream_port", type=int)
    s.set_defaults(fn=forward)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
