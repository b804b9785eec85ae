//! A whole QMP session: bytes in, replies out, with deferred and panicking handlers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_tests::fuzz_checks::check_session(data));
