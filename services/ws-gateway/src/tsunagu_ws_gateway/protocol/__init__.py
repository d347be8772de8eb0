"""Sans-I/O protocol cores: bytes in, commands out; replies and pushes in, frames out. No sockets here."""
