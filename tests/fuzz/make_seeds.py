#!/usr/bin/env python3
"""Writes the committed seed corpus, tests/fuzz/seeds/<target>/, from the examples below.

Run once after changing an example (`python3 tests/fuzz/make_seeds.py`) and commit the result.
Seeds are small valid (and nearly valid) inputs of each parser, so that libFuzzer starts
from the grammar instead of discovering it; binary ones (DNS packets, protobuf updates, a TLS
ClientHello, a DER certificate) are built here by hand or with Python's ssl module and openssl.
"""

import os
import shutil
import ssl
import struct
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- authority: :authority values as h2 or a QUIC head carries them ---------------------------
for i, a in enumerate([
    "orders.apps.internal:8080", "ORDERS.Apps.Internal:8080", "secret.apps.internal:8080",
    "remote.apps.internal:8080", "other.apps.internal:9090", "orders.apps.internal",
    "orders.apps.internal:0", "orders.apps.internal:65536", "orders.apps.internal.:8080",
    "10.0.0.1:8080", "[::1]:8080", "localhost:8080", "user@orders.apps.internal:8080",
    "xn--bcher-kva.apps.internal:80", "a" * 64 + ".apps.internal:80",
]):
    write("authority", f"{i:02}", a)

# --- frame: QUIC request and response heads ----------------------------------------------------
for i, h in enumerate([
    "CONNECT orders.apps.internal:8080 ISTHMUS/1\r\n\r\n",
    "CONNECT orders.apps.internal:8080 ISTHMUS/1\r\nforwarded: for=\"10.0.3.7:51234\"\r\n"
    "baggage: k=v\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\nbody",
    "CONNECT orders.apps.internal:8080 ISTHMUS/1\r\nx:\t y \r\n",
    "CONNECT orders.apps.internal:8080 ISTHMUS/1\nbad: lf\n\n",
    "ISTHMUS/1 200 OK\r\n\r\n",
    "ISTHMUS/1 404 Not Found\r\nisthmus-reason: not_exported\r\n\r\n",
    "ISTHMUS/1 503\r\n\r\n",
]):
    write("frame", f"{i:02}", h)

# --- peek: the first bytes of app connections --------------------------------------------------
for i, p in enumerate([
    "GET / HTTP/1.1\r\nHost: orders.apps.internal:8080\r\n\r\n",
    "POST /x HTTP/1.1\r\nContent-Length: 0\r\nhost: Orders.Apps.Internal.\r\nAccept: */*\r\n\r\n",
    "GET / HTTP/1.0\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
    "SSH-2.0-OpenSSH_9.2\r\n",
]):
    write("peek", f"{i:02}", p)


def client_hello(server_name, alpn=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


write("peek", "tls-sni", client_hello("orders.apps.internal"))
write("peek", "tls-sni-alpn", client_hello("billing.apps.internal", ["h2", "http/1.1"]))
write("peek", "tls-no-sni", client_hello(None))


# --- dns: queries as clients send them ---------------------------------------------------------
def qname(name):
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def query(qid, name, qtype, flags=0x0100, edns=None, qclass=1, extra=b""):
    ar = 1 if edns is not None else 0
    msg = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, ar)
    msg += qname(name) + struct.pack(">HH", qtype, qclass)
    if edns is not None:
        msg += b"\0" + struct.pack(">HHIH", 41, edns, 0, 0)
    return msg + extra


A, AAAA, TXT, SOA, ANY, MX = 1, 28, 16, 6, 255, 15
for i, q in enumerate([
    query(0x1234, "orders.apps.internal", A),
    query(0x1235, "orders.apps.internal", AAAA),
    query(0x1236, "ORDERS.apps.internal.", A, edns=1232),
    query(0x1237, "billing.apps.internal", A, edns=4096),
    query(0x1238, "local.apps.internal", A),
    query(0x1239, "nothere.apps.internal", A),
    query(0x123A, "apps.internal", SOA),
    query(0x123B, "orders.apps.internal", TXT),
    query(0x123C, "orders.apps.internal", ANY),
    query(0x123D, "example.com", A),
    query(0x123E, "orders.apps.internal", MX, qclass=3),
    query(0x123F, "orders.apps.internal", A, flags=0x8180),  # a response: dropped
    query(0x1240, "orders.apps.internal", A, flags=0x2800),  # UPDATE opcode
    query(0x1241, "orders.apps.internal", A)[:20],  # cut inside the question
    b"\x12\x42\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00" + qname("a.apps.internal") + b"\0\1\0\1"
    + qname("b.apps.internal") + b"\0\1\0\1",  # two questions
    b"\x12\x43\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # pointer loop
]):
    write("dns", f"{i:02}", q)


# --- update: chunked protobuf Updates, each behind a one-byte length ----------------------------
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return key + varint(len(payload)) + payload


def route(name, port, home, exported=True, peers=("cluster:diego",), backends=(), weights=None,
          vip=""):
    m = field(1, 2, name) + field(2, 0, port) + field(3, 0, 1) + field(4, 2, home)
    if exported:
        m += field(5, 0, 1)
    for p in peers:
        m += field(6, 2, p)
    for b in backends:
        m += field(7, 2, b)
    for c, w in (weights or {}).items():
        m += field(8, 2, field(1, 2, c) + field(2, 0, w))
    if vip:
        m += field(10, 2, vip)
    return m + field(9, 0, 7)


def update(epoch="e1", revision=1, snapshot=False, upserts=(), removals=(), more=False,
           stale=False):
    m = field(1, 2, epoch) + field(2, 0, revision)
    if snapshot:
        m += field(3, 0, 1)
    for r in upserts:
        m += field(4, 2, r)
    for name, port in removals:
        m += field(5, 2, field(1, 2, name) + field(2, 0, port))
    if stale:
        m += field(6, 0, 1)
    m += field(7, 2, "k8s") + field(8, 0, 1_700_000_000_000)
    if more:
        m += field(9, 0, 1)
    return m


def framed(*messages):
    out = b""
    for m in messages:
        assert len(m) < 256, len(m)
        out += bytes([len(m)]) + m
    return out


orders = route("orders.apps.internal", 8080, "k8s")
billing = route("billing.apps.internal", 443, "k8s", weights={"k8s": 90, "diego": 10})
foreign = route("evil.apps.internal", 80, "diego", backends=("10.0.0.1:80",))
hidden = route("hidden.apps.internal", 80, "k8s", exported=False, vip="100.64.0.9")
write("update", "00-snapshot", framed(update(snapshot=True, upserts=[orders, billing])))
write("update", "01-chunked", framed(update(snapshot=True, upserts=[orders], more=True),
                                      update(snapshot=True, upserts=[billing])))
write("update", "02-delta", framed(update(snapshot=True, upserts=[orders]),
                                    update(revision=2, upserts=[billing],
                                           removals=[("orders.apps.internal", 8080)])))
write("update", "03-refused", framed(update(snapshot=True, upserts=[foreign, hidden])))
write("update", "04-stale-only", framed(update(revision=3, stale=True)))

# --- spiffe: IDs as text, and a certificate as DER ---------------------------------------------
for i, s in enumerate([
    "spiffe://mesh.local/cluster/k8s/gateway", "spiffe://mesh.local/cluster/diego/route-sync",
    "spiffe://mesh.local", "spiffe://mesh.local/", "spiffe://Mesh.Local/a",
    "spiffe://mesh.local/a//b", "spiffe://mesh.local/a/./b", "spiffe://mesh.local/a?q",
    "spiffe://user@mesh.local:8443/a", "https://mesh.local/a", "mesh.local",
]):
    write("spiffe", f"{i:02}", s)
with tempfile.TemporaryDirectory() as tmp:
    key, der = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.der")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-outform", "DER", "-out", der, "-days", "1",
         "-subj", "/O=Isthmus/OU=k8s/CN=gateway",
         "-addext", "subjectAltName=URI:spiffe://mesh.local/cluster/k8s/gateway"],
        check=True, capture_output=True)
    with open(der, "rb") as f:
        write("spiffe", "cert.der", f.read())

# --- config: a selector byte (g, r, d) and a YAML config ---------------------------------------
TLS = "tls: {cert: cert.pem, key: key.pem, bundle: ca.pem, reload_interval: 500ms}\n"
write("config", "g-egress", "g" + """cluster: diego
trust_domain: mesh.local
""" + TLS + """routes: {route_sync: {endpoints: ["127.0.0.1:15010"], cache: /var/lib/isthmus/routes.pb}}
egress:
  peers: [{cluster: k8s, endpoints: ["10.0.8.5:15008", "10.0.8.6:15008"], transport: quic}]
  listen_address: 0.0.0.0
  vip_range: 100.64.0.0/16
  dedicated: [{listen: "127.0.0.1:18080", route: "orders.apps.internal:8080"}]
  pool: {connect_timeout: 500ms, handshake_timeout: 2s}
admin: {listen: "0.0.0.0:15020"}
drain_timeout: 30s
""")
write("config", "g-ingress", "g" + """cluster: k8s
trust_domain: mesh.local
""" + TLS + """routes: {file: routes.yaml, poll_interval: 1s}
ingress: {listen: "0.0.0.0:15008", quic: true}
""")
write("config", "r-route-sync", "r" + """cluster: k8s
trust_domain: mesh.local
""" + TLS + """listen: "0.0.0.0:15010"
admin: {listen: "0.0.0.0:15020"}
source: {file: k8s-routes.yaml, poll_interval: 500ms}
peers: [{cluster: diego, endpoints: ["10.0.16.5:15010"]}]
state_dir: /var/lib/isthmus/route-sync
""")
write("config", "d-vip", "d" + """cluster: diego
domains: [apps.internal]
listen: "0.0.0.0:53"
ttl: 0
negative_ttl: 0
answer: {vip_range: 100.64.0.0/16}
upstream: {kind: dns, servers: ["10.0.8.5", "10.0.8.6:5353"]}
upstream_timeout: 2s
tcp_idle_timeout: 10s
routes: {file: routes.yaml, poll_interval: 500ms}
admin: {listen: "0.0.0.0:15021"}
udp_sockets: 0
""")
write("config", "d-route-sync", "d" + """cluster: k8s
domains: [apps.internal, svc.internal]
listen: "127.0.0.1:10053"
answer: {egress: [10.0.4.7, "fd00::7"]}
upstream: {kind: sdc, url: "https://sdc.service.cf.internal:8054", ca: ca.crt, cert: c.crt, key: c.key}
routes:
  route_sync:
    endpoints: ["127.0.0.1:15010"]
    trust_domain: mesh.local
    """ + TLS + """    cache: /var/lib/isthmus/shim-routes.pb
""")
write("config", "d-bad-field", "d" + "cluster: diego\nbogus: 1\n")

# --- route_file: route files, whole, empty, cut short and with bad entries ---------------------
ROUTES = """routes:
  - {name: orders.apps.internal, port: 8080, protocol: http, home_cluster: diego,
     exported: true, allowed_peers: ["cluster:k8s"], backends: ["10.0.3.7:8080"]}
  - name: billing.apps.internal
    port: 443
    protocol: tls
    home_cluster: k8s
    exported: true
    allowed_peers: ["spiffe://mesh.local/cluster/diego/gateway", "cluster:diego"]
    backends: ["billing.default.svc:443", "[fd00::1]:443"]
    weights: {k8s: 90, diego: 10}
  - {name: 10.0.0.1, port: 80, home_cluster: k8s}
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s}
"""
write("route_file", "00-routes", ROUTES)
write("route_file", "01-empty-list", "routes: []\n")
write("route_file", "02-null", "routes:\n")
write("route_file", "03-cut", ROUTES[: len(ROUTES) // 2])
write("route_file", "04-empty", "")

print("seeds written:", sum(len(fs) for _, _, fs in os.walk(SEEDS)), "files in", SEEDS)
