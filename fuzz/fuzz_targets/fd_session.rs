//! A QMP session on a real Unix socket with random fd arrivals mixed into random frames.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_tests::fuzz_fds::check_fd_session(data));
