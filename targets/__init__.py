"""What the tool knows about hardware: device profiles, the host, and transports to devices."""
