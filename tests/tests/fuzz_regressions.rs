//! Replays every input the fuzzers found (`fuzz/regressions/<target>/`) and the seed corpora
//! (`fuzz/corpus/<target>/seed-*`) through the fuzz targets' own checks, on stable Rust.

use std::path::PathBuf;

use qmp_tests::{fuzz_checks, fuzz_fds};

/// Runs `check` on every regression and seed input of `target`; returns how many ran.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs = Vec::new();
    for (dir, prefix) in [("regressions", ""), ("corpus", "seed-")] {
        let dir = fuzz.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("read dir").path();
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_file() && name.starts_with(prefix) && !name.starts_with('.') {
                inputs.push(path);
            }
        }
    }
    inputs.sort();
    for path in &inputs {
        let data = std::fs::read(path).expect("read input");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} fails its check", path.display());
    }
    inputs.len()
}

#[test]
fn decoder_regressions() {
    assert!(replay("decoder", fuzz_checks::check_decoder) > 0);
}

#[test]
fn session_regressions() {
    assert!(replay("session", fuzz_checks::check_session) > 0);
}

#[test]
fn guest_agent_regressions() {
    assert!(replay("guest_agent", fuzz_checks::check_guest_agent) > 0);
}

#[test]
fn fd_session_regressions() {
    assert!(replay("fd_session", fuzz_fds::check_fd_session) > 0);
}
