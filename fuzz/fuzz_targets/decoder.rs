//! The JSON decoder fed arbitrary bytes in arbitrary splits.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_tests::fuzz_checks::check_decoder(data));
