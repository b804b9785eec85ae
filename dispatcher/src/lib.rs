//! Server side of the QEMU Machine Protocol.
pub mod wire;
