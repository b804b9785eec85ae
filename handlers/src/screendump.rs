//! `screendump`: renders a framebuffer to PPM or PNG off the monitor, replying when the file
//! is complete; a cancelled dump stops and removes its partial file.
//!
//! A dump never waits on its target inside a thread: the file is opened with `O_NONBLOCK`
//! (a FIFO without a reader fails at once, as QEMU's does), a FIFO is written from an async
//! task, and the short blocking steps (open, snapshot and encoding, writing a regular file)
//! run on tokio's blocking pool at most [`Screendump::new`]'s `max_blocking` at a time.
//! Cancellation is noticed between chunks and ends the dump within one chunk's time.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use qmp_dispatcher::{Command, QmpError, QmpReturn};
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::display::{
    DumpError, Encoded, Framebuffer, ImageFormat, encode, open_error, remove_partial,
    write_encoded, write_error,
};

/// `screendump` arguments, as QEMU's schema has them.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScreendumpArgs {
    /// Where to write the image.
    pub filename: PathBuf,
    /// The display device; absent means the primary display.
    pub device: Option<String>,
    /// The head of a multi-head device.
    pub head: Option<i64>,
    /// Image format, `ppm` by default.
    #[serde(default)]
    pub format: ImageFormat,
}

/// A display a VMM exposes to `screendump`: its QOM device id and its framebuffer.
#[derive(Clone)]
pub struct Display {
    /// The device id `screendump` accepts in `device`.
    pub device: String,
    /// The pixels.
    pub framebuffer: Arc<dyn Framebuffer>,
}

/// The `screendump` command over a display, with its bound on blocking work.
pub struct Screendump {
    display: Display,
    blocking: Arc<Semaphore>,
    chunk_delay: Duration,
}

impl Screendump {
    /// `screendump` over `display`, running at most `max_blocking` blocking steps (opening,
    /// snapshot and encoding, writing a regular file) at once, whatever the number of dumps
    /// in flight. A step stuck in the kernel (a hung network file system) keeps its slot, so
    /// `max_blocking` is also how many threads such targets can ever pin. Every snapshot an
    /// encoding holds is one framebuffer's worth of memory.
    ///
    /// # Panics
    ///
    /// If `max_blocking` is zero.
    pub fn new(display: Display, max_blocking: usize) -> Self {
        assert!(
            max_blocking > 0,
            "screendump needs at least one blocking slot"
        );
        Screendump {
            display,
            blocking: Arc::new(Semaphore::new(max_blocking)),
            chunk_delay: Duration::ZERO,
        }
    }

    /// Test hook: sleep `delay` at every cancellation check (before the file is opened,
    /// between chunks of rows while encoding, between chunks written), so that tests can
    /// catch a dump in flight.
    #[doc(hidden)]
    pub fn chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// The deferred, cancellable command: it replies when the file is complete.
    pub fn command<S: Send + Sync + 'static>(self) -> Command<S> {
        let dumper = Arc::new(self);
        Command::deferred(
            "screendump",
            move |args: ScreendumpArgs, _, ret: QmpReturn| {
                if let Some(device) = &args.device {
                    if *device != dumper.display.device {
                        return ret.err(QmpError::device_not_found(format!(
                            "Device '{device}' not found"
                        )));
                    }
                }
                if let Some(head) = args.head {
                    if head != 0 {
                        return ret.err(QmpError::generic(format!(
                            "Head {head} not found on device {}",
                            dumper.display.device
                        )));
                    }
                }
                // On the server's tracker, so `Server::wait` waits for the dump.
                let dumper = Arc::clone(&dumper);
                ret.spawn(move |ret| dumper.dump(args, ret));
            },
        )
        .returns::<()>()
    }

    /// One dump, from opening the file to the reply. Whether it was cancelled or completed
    /// is decided at one point, together with the fate of the file.
    async fn dump(self: Arc<Self>, args: ScreendumpArgs, ret: QmpReturn) {
        let cancel = ret.cancellation_token();
        let mut opening = tokio::spawn({
            let dumper = Arc::clone(&self);
            let path = args.filename.clone();
            async move {
                dumper.pause().await;
                dumper.blocking(move || Target::open(path)).await?
            }
        });
        let target = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                // The open may still create the file: whoever gets it removes it.
                tokio::spawn(async move {
                    if let Ok(Ok(target)) = opening.await {
                        target.discard();
                    }
                });
                return;
            }
            opened = &mut opening => match opened {
                Ok(Ok(target)) => target,
                Ok(Err(DumpError::Cancelled)) => return,
                Ok(Err(error)) => return ret.err(QmpError::generic(error.to_string())),
                Err(join) => std::panic::resume_unwind(join.into_panic()),
            },
        };
        let path = target.path.clone();
        let removable = target.regular;
        let result = tokio::select! {
            biased;
            () = cancel.cancelled() => Err(DumpError::Cancelled),
            result = self.fill(target, args.format, &cancel) => result,
        };
        let kept = match result {
            Ok(()) => ret.ok_unless_cancelled(&json!({})),
            // The client is gone or cancelled it, and was told so; nobody waits.
            Err(DumpError::Cancelled) => false,
            Err(error) => {
                ret.err(QmpError::generic(error.to_string()));
                false
            }
        };
        if !kept && removable {
            remove_partial(&path);
        }
    }

    /// Takes the snapshot, encodes it and writes it to the open `target`.
    async fn fill(
        &self,
        target: Target,
        format: ImageFormat,
        cancel: &CancellationToken,
    ) -> Result<(), DumpError> {
        let framebuffer = Arc::clone(&self.display.framebuffer);
        let check = self.check(cancel);
        let encoded = self
            .blocking(move || encode(framebuffer.snapshot(), format, &check))
            .await??;
        if target.fifo {
            // A FIFO's reader may be slow or never read: wait for it without a thread.
            let mut pipe =
                tokio::net::unix::pipe::Sender::from_file(target.file).map_err(write_error)?;
            for chunk in encoded.chunks() {
                self.pause().await;
                pipe.write_all(chunk).await.map_err(write_error)?;
            }
            pipe.flush().await.map_err(write_error)
        } else {
            let check = self.check(cancel);
            self.blocking(move || target.write_blocking(&encoded, &check))
                .await?
        }
    }

    /// Runs `work` on the blocking pool once one of the `max_blocking` slots is free. Waiting
    /// for the slot is cancelled with the caller; the work itself runs to its end.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, DumpError> {
        let slot = Arc::clone(&self.blocking)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let work = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work()
        });
        match work.await {
            Ok(value) => Ok(value),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(DumpError::Cancelled),
        }
    }

    /// The cancellation check blocking steps poll between chunks.
    fn check(&self, cancel: &CancellationToken) -> impl Fn() -> bool + Send + 'static {
        let cancel = cancel.clone();
        let delay = self.chunk_delay;
        move || {
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            cancel.is_cancelled()
        }
    }

    async fn pause(&self) {
        if !self.chunk_delay.is_zero() {
            tokio::time::sleep(self.chunk_delay).await;
        }
    }
}

/// The `screendump` command over `display`; see [`Screendump::new`] for `max_blocking`.
pub fn command(display: Display, max_blocking: usize) -> Command {
    Screendump::new(display, max_blocking).command()
}

/// An opened screendump file.
struct Target {
    file: File,
    path: PathBuf,
    /// A regular file we created or truncated: ours to remove if the dump fails.
    regular: bool,
    /// Written from an async task, left non-blocking.
    fifo: bool,
}

impl Target {
    /// Opens `path` as QEMU does (write-only, created 0666 minus umask, truncated), but
    /// without blocking: a FIFO without a reader fails at once with ENXIO.
    fn open(path: PathBuf) -> Result<Target, DumpError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(OFlag::O_NONBLOCK.bits())
            .open(&path)
            .map_err(|error| open_error(&path, &error))?;
        let kind = file
            .metadata()
            .map_err(|error| open_error(&path, &error))?
            .file_type();
        let target = Target {
            regular: kind.is_file(),
            fifo: kind.is_fifo(),
            file,
            path,
        };
        if !target.fifo {
            // Written with plain blocking writes, which must not fail with EAGAIN.
            if let Err(errno) = fcntl(&target.file, FcntlArg::F_SETFL(OFlag::empty())) {
                let error = open_error(&target.path, &errno.into());
                target.discard();
                return Err(error);
            }
        }
        Ok(target)
    }

    /// Writes the whole image on the calling (blocking) thread and closes the file.
    fn write_blocking(
        self,
        encoded: &Encoded,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), DumpError> {
        let mut file = self.file;
        write_encoded(encoded, &mut file, cancelled)
    }

    /// Closes the file and removes it if it is ours.
    fn discard(self) {
        drop(self.file);
        if self.regular {
            remove_partial(&self.path);
        }
    }
}
