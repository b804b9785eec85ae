//! Job ids: QEMU's syntax (`id_wellformed`) and the errors of creating a job with an id.

use crate::error::QmpError;

/// QEMU's rule for ids: an ASCII letter, then ASCII letters, digits, `-`, `.` and `_`.
pub fn is_well_formed(id: &str) -> bool {
    let mut bytes = id.bytes();
    bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// `Invalid job ID '<id>'`.
pub(crate) fn invalid(id: &str) -> QmpError {
    QmpError::generic(format!("Invalid job ID '{id}'"))
}

/// `Job ID '<id>' already in use`: a job of that id exists, even concluded.
pub(crate) fn in_use(id: &str) -> QmpError {
    QmpError::generic(format!("Job ID '{id}' already in use"))
}

/// `Parameter 'job-id' is missing`: a command that can only start a job got no id.
pub fn missing() -> QmpError {
    QmpError::generic("Parameter 'job-id' is missing")
}

/// `Job not found`: no job has that id (or it was dismissed).
pub(crate) fn not_found() -> QmpError {
    QmpError::generic("Job not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_id_syntax() {
        for good in ["j1", "b1", "m1s", "a", "A-b.c_d9", "x--"] {
            assert!(is_well_formed(good), "{good}");
        }
        for bad in ["", "1x", "-a", ".a", "_a", "a b", "a/b", "é", "aé", "a\0"] {
            assert!(!is_well_formed(bad), "{bad:?}");
        }
    }

    #[test]
    fn error_texts() {
        assert_eq!(invalid("1x").desc, "Invalid job ID '1x'");
        assert_eq!(in_use("j1").desc, "Job ID 'j1' already in use");
        assert_eq!(missing().desc, "Parameter 'job-id' is missing");
        assert_eq!(not_found().desc, "Job not found");
    }
}
