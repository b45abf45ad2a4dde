"""trs package: the Tunnel Relay Server (core, asyncio glue, configuration)."""
