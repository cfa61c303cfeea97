"""The specialized TCP/IP stack: Ethernet, ARP, IPv4, ICMP, UDP, DHCPv4, IPv6 and a
server-only TCP (both families, TLS on top) that sends prebuilt responses from
the content store (Sandstorm-style).

Theory of operation, by layer (each testable alone; see each module):
    wire.py, ethernet.py, arp.py, ipv4.py, icmp.py, udp.py, tcp.py
                  checked parse / emit of every header (the control path)
    dhcp4.py, route.py, ipv6.py, lease.py
                  DHCPv4 client, route table, IPv6 ND/SLAAC/MLD, the
                  multi-worker lease
    tls.py        HTTPS: TLS over memory BIOs on a Conn subclass
    seq.py        sequence numbers with wrap-around comparison
    isn.py        RFC 6528 ISNs and SYN cookies
    timers.py     RFC 6298 RTO estimator;  cc.py: NewReno (RFC 5681/6582)
    conn.py       one TCP connection: state machine, send from the store
    iface.py      the Stack: dispatch, LISTEN, TIME-WAIT, ARP cache, timers
    counters.py   counters by name, drops as drop_<reason>
    rings/        the Device interface (base.py) and backends: memory (tests),
                  tpacket (AF_PACKET rings), pcap (recording wrapper)
    serve.py, cli.py
                  the batch loop over a device and `python -m appliance serve`
Nothing below serve.py reads a clock or does I/O: time is passed in.
"""
