//! The server's fd sets: `add-fd`, `remove-fd`, `query-fdsets`, and opening `/dev/fdset/N`,
//! with QEMU 10.0's rules and texts.
//!
//! Sets are server-wide, as QEMU's are global: every client sees and may remove them. An fd
//! in a set is closed only by `remove-fd` (or when the server is dropped); disconnects close
//! nothing. A set disappears once it has no fds and no open dup, so an emptied set stays
//! listed while a handler still holds a file it opened from it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::error::QmpError;

/// How a handler means to use a file it opens from an fd set; a set member is chosen by its
/// access mode, as QEMU's `qemu_open` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `O_RDONLY`.
    ReadOnly,
    /// `O_WRONLY`.
    WriteOnly,
    /// `O_RDWR`.
    ReadWrite,
}

impl Access {
    fn bits(self) -> i32 {
        match self {
            Access::ReadOnly => OFlag::O_RDONLY.bits(),
            Access::WriteOnly => OFlag::O_WRONLY.bits(),
            Access::ReadWrite => OFlag::O_RDWR.bits(),
        }
    }
}

/// `add-fd`'s reply, members in QEMU's order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct AddFdInfo {
    /// The fd's number in this server, as `remove-fd` takes it.
    pub(crate) fd: i64,
    pub(crate) fdset_id: i64,
}

/// One set in `query-fdsets`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct FdsetInfo {
    pub(crate) fds: Vec<FdsetFdInfo>,
    pub(crate) fdset_id: i64,
}

/// One fd of a set in `query-fdsets`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub(crate) struct FdsetFdInfo {
    pub(crate) fd: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) opaque: Option<String>,
}

#[derive(Debug)]
struct Member {
    fd: OwnedFd,
    opaque: Option<String>,
}

#[derive(Debug, Default)]
struct Set {
    /// In insertion order, as `query-fdsets` lists them.
    members: Vec<Member>,
    /// Files opened from the set and still open.
    dups: usize,
}

#[derive(Debug)]
struct Inner {
    sets: BTreeMap<i64, Set>,
    fds: usize,
}

/// A server's fd sets. Shared: handlers' [`FdsetFile`]s point back here.
#[derive(Debug)]
pub(crate) struct FdSets {
    inner: Mutex<Inner>,
    max_sets: usize,
    max_fds: usize,
}

impl FdSets {
    /// At most `max_sets` sets holding `max_fds` fds together.
    pub(crate) fn new(max_sets: usize, max_fds: usize) -> Self {
        FdSets {
            inner: Mutex::new(Inner {
                sets: BTreeMap::new(),
                fds: 0,
            }),
            max_sets,
            max_fds,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent at every await-free step; a panic elsewhere leaves
        // nothing half-done here.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `add-fd`: puts `fd` into set `fdset_id`, or into the lowest unused id. On error the
    /// fd is closed, as QEMU closes it.
    pub(crate) fn add(
        &self,
        fd: OwnedFd,
        fdset_id: Option<i64>,
        opaque: Option<String>,
    ) -> Result<AddFdInfo, QmpError> {
        if fdset_id.is_some_and(|id| id < 0) {
            return Err(QmpError::generic(
                "Parameter 'fdset-id' expects a non-negative value",
            ));
        }
        let mut inner = self.lock();
        let id = fdset_id.unwrap_or_else(|| lowest_unused(&inner.sets));
        if inner.fds >= self.max_fds {
            return Err(QmpError::generic(format!(
                "Too many file descriptors in fd sets: the server holds at most {}",
                self.max_fds
            )));
        }
        if !inner.sets.contains_key(&id) && inner.sets.len() >= self.max_sets {
            return Err(QmpError::generic(format!(
                "Too many fd sets: the server holds at most {}",
                self.max_sets
            )));
        }
        let number = i64::from(fd.as_raw_fd());
        inner.fds += 1;
        let set = inner.sets.entry(id).or_default();
        set.members.push(Member { fd, opaque });
        Ok(AddFdInfo {
            fd: number,
            fdset_id: id,
        })
    }

    /// `remove-fd`: closes one fd of a set, or all of them.
    pub(crate) fn remove(&self, fdset_id: i64, fd: Option<i64>) -> Result<(), QmpError> {
        let not_found = || {
            QmpError::generic(match fd {
                Some(fd) => {
                    format!("File descriptor named 'fdset-id:{fdset_id}, fd:{fd}' not found")
                }
                None => format!("File descriptor named 'fdset-id:{fdset_id}' not found"),
            })
        };
        let mut inner = self.lock();
        let Some(set) = inner.sets.get_mut(&fdset_id) else {
            return Err(not_found());
        };
        let removed = match fd {
            Some(number) => {
                let at = set
                    .members
                    .iter()
                    .position(|m| i64::from(m.fd.as_raw_fd()) == number)
                    .ok_or_else(not_found)?;
                drop(set.members.remove(at));
                1
            }
            None => std::mem::take(&mut set.members).len(),
        };
        inner.fds -= removed;
        inner.forget_if_unused(fdset_id);
        Ok(())
    }

    /// `query-fdsets`: sets by descending id, fds in the order they were added.
    pub(crate) fn query(&self) -> Vec<FdsetInfo> {
        let inner = self.lock();
        inner
            .sets
            .iter()
            .rev()
            .map(|(&id, set)| FdsetInfo {
                fds: set
                    .members
                    .iter()
                    .map(|m| FdsetFdInfo {
                        fd: i64::from(m.fd.as_raw_fd()),
                        opaque: m.opaque.clone(),
                    })
                    .collect(),
                fdset_id: id,
            })
            .collect()
    }

    /// Opens `/dev/fdset/N` as QEMU's `qemu_open` does: a dup of the set's first fd whose
    /// access mode is `access`, close-on-exec. The set stays alive while the file is open.
    pub(crate) fn open(
        self: &Arc<Self>,
        path: &str,
        access: Access,
    ) -> Result<FdsetFile, QmpError> {
        let id = parse_fdset_path(path)
            .ok_or_else(|| QmpError::generic(format!("Could not parse fdset {path}")))?;
        let mut inner = self.lock();
        let Some(set) = inner.sets.get_mut(&id) else {
            return Err(QmpError::generic(format!(
                "Failed to find fdset /dev/fdset/{id}"
            )));
        };
        let member = set
            .members
            .iter()
            .find(|m| access_mode(m.fd.as_fd()) == Some(access.bits()))
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "Failed to find file descriptor with matching flags=0x{:x}",
                    access.bits()
                ))
            })?;
        let dup = member
            .fd
            .try_clone()
            .map_err(|e| QmpError::generic(format!("Could not dup FD for /dev/fdset/{id}: {e}")))?;
        set.dups += 1;
        Ok(FdsetFile {
            file: File::from(dup),
            lease: Lease {
                sets: Arc::clone(self),
                id,
            },
        })
    }

    /// Fds held in sets.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().fds
    }
}

impl Inner {
    /// Drops set `id` if it holds no fds and no file opened from it is open.
    fn forget_if_unused(&mut self, id: i64) {
        if self
            .sets
            .get(&id)
            .is_some_and(|s| s.members.is_empty() && s.dups == 0)
        {
            self.sets.remove(&id);
        }
    }
}

/// The lowest id no set has.
fn lowest_unused(sets: &BTreeMap<i64, Set>) -> i64 {
    let mut id = 0;
    for &taken in sets.keys() {
        if taken != id {
            break;
        }
        id += 1;
    }
    id
}

fn access_mode(fd: BorrowedFd<'_>) -> Option<i32> {
    fcntl(fd, FcntlArg::F_GETFL)
        .ok()
        .map(|bits| bits & OFlag::O_ACCMODE.bits())
}

/// The set id in `/dev/fdset/N`, read as `strtoll` would with nothing after the number.
/// `None` when `path` is not of that form.
pub(crate) fn parse_fdset_path(path: &str) -> Option<i64> {
    let number = path.strip_prefix("/dev/fdset/")?;
    let number = number.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let digits = number.strip_prefix(['+', '-']).unwrap_or(number);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.strip_prefix('+').unwrap_or(number).parse().ok()
}

/// True when `path` names an fd set (`/dev/fdset/...`), well-formed or not: a handler then
/// opens it through its request context instead of the file system.
pub fn is_fdset_path(path: &str) -> bool {
    path.starts_with("/dev/fdset/")
}

/// A file a handler opened from an fd set (`/dev/fdset/N`): a dup of a member, which keeps
/// its set alive until dropped, as QEMU keeps a set while a dup of it is open.
#[derive(Debug)]
pub struct FdsetFile {
    file: File,
    lease: Lease,
}

impl FdsetFile {
    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The open file, mutably (to write to it).
    pub fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// The set it was opened from.
    pub fn fdset_id(&self) -> i64 {
        self.lease.id
    }
}

impl AsFd for FdsetFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl io::Write for FdsetFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl io::Read for FdsetFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

/// A set's open-dup count, released on drop.
#[derive(Debug)]
struct Lease {
    sets: Arc<FdSets>,
    id: i64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut inner = self.sets.lock();
        if let Some(set) = inner.sets.get_mut(&self.id) {
            set.dups -= 1;
        }
        inner.forget_if_unused(self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn sets() -> Arc<FdSets> {
        Arc::new(FdSets::new(256, 1024))
    }

    fn write_end() -> (OwnedFd, OwnedFd) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (w, r)
    }

    fn json(sets: &FdSets) -> String {
        serde_json::to_string(&sets.query()).unwrap()
    }

    #[test]
    fn ids_order_and_opaque_follow_qemu() {
        let s = sets();
        let (a, _ra) = write_end();
        let a = s.add(a, None, None).unwrap();
        assert_eq!(a.fdset_id, 0);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            format!(r#"{{"fd":{},"fdset-id":0}}"#, a.fd)
        );
        let (b, _rb) = write_end();
        let b = s.add(b, Some(0), Some("x".into())).unwrap();
        let (c, _rc) = write_end();
        let c = s.add(c, Some(5), None).unwrap();
        let (d, _rd) = write_end();
        let d = s.add(d, None, Some(String::new())).unwrap();
        assert_eq!(d.fdset_id, 1, "the lowest unused id, not 6");
        assert_eq!(
            json(&s),
            format!(
                r#"[{{"fds":[{{"fd":{}}}],"fdset-id":5}},{{"fds":[{{"fd":{},"opaque":""}}],"fdset-id":1}},{{"fds":[{{"fd":{}}},{{"fd":{},"opaque":"x"}}],"fdset-id":0}}]"#,
                c.fd, d.fd, a.fd, b.fd
            )
        );
    }

    #[test]
    fn remove_closes_at_once_and_errors_as_qemu() {
        let s = sets();
        let (a, _ra) = write_end();
        let a = s.add(a, None, None).unwrap();
        s.remove(0, Some(a.fd)).unwrap();
        assert_eq!(json(&s), "[]");
        let text = |r: Result<(), QmpError>| r.unwrap_err().desc;
        assert_eq!(
            text(s.remove(0, Some(a.fd))),
            format!("File descriptor named 'fdset-id:0, fd:{}' not found", a.fd)
        );
        assert_eq!(
            text(s.remove(99, None)),
            "File descriptor named 'fdset-id:99' not found"
        );
        assert_eq!(
            text(s.remove(-1, None)),
            "File descriptor named 'fdset-id:-1' not found"
        );
        assert_eq!(
            text(s.remove(99, Some(3))),
            "File descriptor named 'fdset-id:99, fd:3' not found"
        );
        let (e, _re) = write_end();
        assert_eq!(
            s.add(e, Some(-1), None).unwrap_err().desc,
            "Parameter 'fdset-id' expects a non-negative value"
        );
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn an_open_dup_keeps_an_emptied_set() {
        let s = sets();
        let (w, r) = write_end();
        let added = s.add(w, None, Some("img".into())).unwrap();
        let mut file = s.open("/dev/fdset/0", Access::WriteOnly).unwrap();
        s.remove(0, Some(added.fd)).unwrap();
        assert_eq!(json(&s), r#"[{"fds":[],"fdset-id":0}]"#);
        assert_eq!(
            s.open("/dev/fdset/0", Access::WriteOnly).unwrap_err().desc,
            "Failed to find file descriptor with matching flags=0x1"
        );
        s.remove(0, None).unwrap();
        file.write_all(b"png").unwrap();
        drop(file);
        assert_eq!(json(&s), "[]");
        let mut got = Vec::new();
        File::from(r).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"png", "the write end closed with the dup");
    }

    #[test]
    fn open_errors_are_qemus() {
        let s = sets();
        let (w, _r) = write_end();
        s.add(w, None, None).unwrap();
        let text = |p: &str, a| s.open(p, a).unwrap_err().desc;
        assert_eq!(
            text("/dev/fdset/0", Access::ReadWrite),
            "Failed to find file descriptor with matching flags=0x2"
        );
        assert_eq!(
            text("/dev/fdset/7", Access::WriteOnly),
            "Failed to find fdset /dev/fdset/7"
        );
        assert_eq!(
            text("/dev/fdset/x", Access::WriteOnly),
            "Could not parse fdset /dev/fdset/x"
        );
        assert!(s.open("/dev/fdset/+0", Access::WriteOnly).is_ok());
    }

    #[test]
    fn paths_parse_like_strtoll_without_trailing_text() {
        assert_eq!(parse_fdset_path("/dev/fdset/12"), Some(12));
        assert_eq!(parse_fdset_path("/dev/fdset/ -3"), Some(-3));
        for bad in ["/dev/fdset/", "/dev/fdset/1x", "/dev/fdset/-", "/tmp/x"] {
            assert_eq!(parse_fdset_path(bad), None, "{bad}");
        }
        assert_eq!(parse_fdset_path("/dev/fdset/99999999999999999999"), None);
    }

    #[test]
    fn limits_refuse_and_close() {
        let s = Arc::new(FdSets::new(1, 2));
        let (a, _ra) = write_end();
        s.add(a, None, None).unwrap();
        let (b, _rb) = write_end();
        assert!(s.add(b, None, None).unwrap_err().desc.contains("at most 1"));
        let (c, _rc) = write_end();
        s.add(c, Some(0), None).unwrap();
        let (d, _rd) = write_end();
        assert!(
            s.add(d, Some(0), None)
                .unwrap_err()
                .desc
                .contains("at most 2")
        );
    }
}
