//! Shared helpers for the integration tests: start a server, talk raw QMP over a socket.
