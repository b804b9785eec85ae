//! Binding a QMP Unix socket: owner-only from the first moment, and never over a live one.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

/// Binds a Unix socket for QMP at `path`, restricted to `mode` (0o600 is the safe default:
/// whoever can connect controls the VM).
///
/// A socket file left by an earlier run that nothing answers on any more (stale) is replaced.
/// A socket that a running server still accepts on is not: that fails with
/// [`io::ErrorKind::AddrInUse`], so a second instance cannot silently take over the first
/// one's clients. Any other file at `path` is left alone and binding fails.
///
/// Must be called inside a tokio runtime (like [`UnixListener::bind`]).
pub fn bind_unix(path: impl AsRef<Path>, mode: u32) -> io::Result<UnixListener> {
    let path = path.as_ref();
    if std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket()) {
        remove_if_stale(path)?;
    }
    // Bind inside a private (0700) directory and set the mode there, then link the socket into
    // place: nobody can connect in the moment between bind() and chmod(). Linking (unlike
    // renaming) fails rather than replace a file that is not ours.
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".qmp-bind-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)?;
    let staged = staging.path().join("s");
    let listener = UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    std::fs::hard_link(&staged, path)?;
    // `staging` (and the staged name) goes when it drops; the socket stays at `path`.
    Ok(listener)
}

/// Removes the socket file at `path` if connecting to it is refused; fails if a server
/// accepts the connection (or if it cannot be told, e.g. no permission to connect).
fn remove_if_stale(path: &Path) -> io::Result<()> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_live) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use: a running server accepts connections on it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                // Someone else cleaned it up meanwhile: just as good.
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        // Gone meanwhile: nothing to replace.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!(
                "{} exists and cannot be checked for a live server: {e}",
                path.display()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("qmp-bind-test-")
            .tempdir()
            .unwrap()
    }

    /// Only the socket is left in the directory: the staging directory is gone.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn binds_owner_only_and_leaves_no_staging_directory() {
        let dir = scratch();
        let path = dir.path().join("qmp.sock");
        let _listener = bind_unix(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        assert_eq!(entries(dir.path()), ["qmp.sock"]);
    }

    #[tokio::test]
    async fn a_live_socket_is_not_taken() {
        let dir = scratch();
        let path = dir.path().join("qmp.sock");
        let first = bind_unix(&path, 0o600).unwrap();
        let err = bind_unix(&path, 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(err.to_string().contains("is in use"), "{err}");
        // The first listener still owns the path: a client reaches it.
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (_accepted, _) = first.accept().await.unwrap();
        assert_eq!(entries(dir.path()), ["qmp.sock"]);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let dir = scratch();
        let path = dir.path().join("qmp.sock");
        drop(bind_unix(&path, 0o600).unwrap());
        assert!(path.exists(), "a dropped listener leaves its file");
        let again = bind_unix(&path, 0o600).expect("rebind over a stale socket");
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (_accepted, _) = again.accept().await.unwrap();
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = scratch();
        let path = dir.path().join("data");
        std::fs::write(&path, b"data").unwrap();
        let err = bind_unix(&path, 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        assert_eq!(entries(dir.path()), ["data"]);
    }
}
