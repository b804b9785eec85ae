//! Raising `RLIMIT_NOFILE` for runs with many clients.
//!
//! Each client is one descriptor in the generator and one in the server, so 100,000 clients
//! need over 100,000 open files in each process. A process may raise its soft limit up to
//! its hard limit; only a privileged one (`CAP_SYS_RESOURCE`) may raise the hard limit, up
//! to the kernel's `fs.nr_open`. Children inherit both, so a tool that raises its own limit
//! before spawning a server raises the server's too.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors a process needs besides its clients: listeners, pipes, the runtime's own,
/// `/proc` files being read.
pub const SPARE_DESCRIPTORS: u64 = 256;

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit and, if that is below
/// `needed`, tries to raise the hard limit to `needed` (which succeeds only with
/// `CAP_SYS_RESOURCE`, and only up to `fs.nr_open`). Returns the soft limit now in force.
///
/// Fails, naming the limit and how to lift it, when `needed` descriptors cannot be had;
/// the soft limit has still been raised as far as the hard limit allows.
pub fn raise_to(needed: u64) -> Result<u64, String> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|err| format!("cannot read RLIMIT_NOFILE: {err}"))?;
    if hard > soft {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .map_err(|err| format!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {err}"))?;
    }
    if hard >= needed {
        return Ok(hard);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, needed, needed) {
        Ok(()) => Ok(needed),
        Err(err) => Err(format!(
            "{needed} open files needed, but the hard limit is {hard} and raising it failed \
             ({err}; it needs CAP_SYS_RESOURCE and at most fs.nr_open = {}): raise it before \
             starting (as root: `ulimit -n {needed}`; under systemd: LimitNOFILE=) or use \
             fewer clients",
            nr_open().map_or_else(|| "?".to_string(), |n| n.to_string())
        )),
    }
}

/// The soft `RLIMIT_NOFILE` in force.
pub fn current() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft)
}

/// The kernel's ceiling on any process's open-file limit (`/proc/sys/fs/nr_open`).
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}
