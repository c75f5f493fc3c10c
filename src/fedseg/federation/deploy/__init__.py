"""Putting a study on machines: certificates and start-up kits, the server's run directory, local mode."""
