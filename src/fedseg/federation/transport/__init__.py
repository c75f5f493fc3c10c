"""Network shells around the sans-I/O protocol: mutual-TLS contexts, kits, asyncio server/client pumps and an in-memory transport."""
