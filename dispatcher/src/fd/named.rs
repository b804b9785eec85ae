//! One connection's named fds: what `getfd` stores and `closefd` closes, with QEMU's texts.
//!
//! QEMU keeps them per monitor, and they outlive a client's disconnect. Here they belong to
//! the connection and close with it: a socket here serves many clients at once, and names
//! shared between them would let one client use or close another's fd.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use crate::error::QmpError;

/// Named fds of one connection.
#[derive(Debug)]
pub(crate) struct NamedFds {
    fds: HashMap<String, OwnedFd>,
    limit: usize,
}

impl NamedFds {
    /// Holds at most `limit` names.
    pub(crate) fn new(limit: usize) -> Self {
        NamedFds {
            fds: HashMap::new(),
            limit,
        }
    }

    /// `getfd`: stores `fd` under `name`, closing an fd the name held. On error `fd` is
    /// closed, as QEMU closes the fd a failed `getfd` took.
    pub(crate) fn insert(&mut self, name: &str, fd: OwnedFd) -> Result<(), QmpError> {
        // Only the first character is checked, and only for ASCII digits, as QEMU does.
        if name.as_bytes().first().is_some_and(u8::is_ascii_digit) {
            return Err(QmpError::generic(
                "Parameter 'fdname' expects a name not starting with a digit",
            ));
        }
        if !self.fds.contains_key(name) && self.fds.len() >= self.limit {
            return Err(QmpError::generic(format!(
                "Too many named file descriptors: a connection may hold at most {}",
                self.limit
            )));
        }
        self.fds.insert(name.to_owned(), fd);
        Ok(())
    }

    /// `closefd`: closes the fd named `name`.
    pub(crate) fn close(&mut self, name: &str) -> Result<(), QmpError> {
        self.fds
            .remove(name)
            .map(drop)
            .ok_or_else(|| not_found(name))
    }

    /// Hands the fd named `name` over, forgetting the name, as QEMU's consuming commands do
    /// (`monitor_get_fd`, with its own text).
    pub(crate) fn take(&mut self, name: &str) -> Result<OwnedFd, QmpError> {
        self.fds.remove(name).ok_or_else(|| {
            QmpError::generic(format!("File descriptor named '{name}' has not been found"))
        })
    }

    /// Names held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.fds.len()
    }

    /// Changes the cap on names; names already held stay.
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Closes every named fd: the connection ends.
    pub(crate) fn clear(&mut self) {
        self.fds.clear();
    }
}

/// QEMU's text for a name that holds no fd, the name verbatim.
pub(crate) fn not_found(name: &str) -> QmpError {
    QmpError::generic(format!("File descriptor named '{name}' not found"))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn fd() -> OwnedFd {
        nix::unistd::pipe().unwrap().1
    }

    #[test]
    fn names_are_exact_and_replace() {
        let mut named = NamedFds::new(4);
        named.insert("a", fd()).unwrap();
        let second = fd();
        let raw = second.as_raw_fd();
        named.insert("a", second).unwrap();
        assert_eq!(named.len(), 1);
        for other in ["A", "a "] {
            assert_eq!(
                named.close(other).unwrap_err().desc,
                format!("File descriptor named '{other}' not found")
            );
        }
        assert_eq!(named.take("a").unwrap().as_raw_fd(), raw);
        assert_eq!(
            named.close("a").unwrap_err().desc,
            "File descriptor named 'a' not found"
        );
    }

    #[test]
    fn only_a_leading_digit_is_refused() {
        let mut named = NamedFds::new(4);
        for bad in ["1x", "9"] {
            assert_eq!(
                named.insert(bad, fd()).unwrap_err().desc,
                "Parameter 'fdname' expects a name not starting with a digit"
            );
        }
        for good in ["x1", "", "a b/é", &"n".repeat(300)] {
            named.insert(good, fd()).unwrap();
            named.close(good).unwrap();
        }
    }

    #[test]
    fn the_limit_counts_names_not_replacements() {
        let mut named = NamedFds::new(1);
        named.insert("a", fd()).unwrap();
        named.insert("a", fd()).unwrap();
        assert!(
            named
                .insert("b", fd())
                .unwrap_err()
                .desc
                .contains("at most 1")
        );
        named.clear();
        assert_eq!(named.len(), 0);
    }
}
