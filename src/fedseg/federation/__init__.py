"""Federation: I/O-free protocol, aggregation strategies, transports."""
