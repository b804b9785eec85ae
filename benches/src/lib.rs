//! Benchmark tools for qmp-dispatcher.
