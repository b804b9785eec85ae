//! qmp-demo: a QEMU-like VMM monitor.
fn main() {}
