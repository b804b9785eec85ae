//! The guest agent: its input split among successive clients, then resynchronised.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_tests::fuzz_checks::check_guest_agent(data));
