"""The code dmcall's services share: contracts, bus, Redis, settings, auth, telemetry."""
