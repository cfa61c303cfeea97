"""NIC ring backends: a receive-batch / transmit-batch Device interface (`base`)
with backends: in-memory pair for tests (`memory`), AF_PACKET TPACKET rings
(`tpacket`), and a pcap-recording wrapper (`pcap`)."""
