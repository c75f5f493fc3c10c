"""Putting a study on machines: provisioning (certificates, kits), the server's run (ServerRun, its run directory) and local mode."""
