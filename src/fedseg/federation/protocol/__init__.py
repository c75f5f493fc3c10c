"""The federation protocol with no I/O: frames, error codes, site names, the server's rounds and the sessions of both ends."""
