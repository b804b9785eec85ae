//! `screendump`: renders a framebuffer to PPM or PNG off the monitor, replying when the file
//! is complete; a cancelled dump stops and removes its partial file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qmp_dispatcher::{Command, QmpError, QmpReturn};
use serde::Deserialize;
use serde_json::json;

use crate::display::{DumpError, Framebuffer, ImageFormat, write_image};

/// `screendump` arguments, as QEMU's schema has them.
#[derive(Debug, Deserialize)]
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

/// The `screendump` command over `display`. The encoding runs on tokio's blocking pool, so
/// the monitor stays responsive; the reply comes when the file is complete.
pub fn command(display: Display) -> Command {
    paced_command(display, Duration::ZERO)
}

/// [`command`] sleeping `chunk_delay` at every cancellation check (before the file is
/// created and between chunks of rows), so that tests can catch a dump in flight.
#[doc(hidden)]
pub fn paced_command(display: Display, chunk_delay: Duration) -> Command {
    Command::deferred("screendump", move |args: ScreendumpArgs, ret: QmpReturn| {
        if let Some(device) = &args.device {
            if *device != display.device {
                return ret.err(QmpError::device_not_found(format!(
                    "Device '{device}' not found"
                )));
            }
        }
        if let Some(head) = args.head {
            if head != 0 {
                return ret.err(QmpError::generic(format!(
                    "Head {head} not found on device {}",
                    display.device
                )));
            }
        }
        let framebuffer = Arc::clone(&display.framebuffer);
        tokio::task::spawn_blocking(move || {
            let cancel = ret.cancellation_token();
            let image = framebuffer.snapshot();
            let cancelled = || {
                if !chunk_delay.is_zero() {
                    std::thread::sleep(chunk_delay);
                }
                cancel.is_cancelled()
            };
            match write_image(&image, args.format, &args.filename, &cancelled) {
                Ok(()) => ret.ok(&json!({})),
                // The client is gone or cancelled it; the file is removed and nobody waits.
                Err(DumpError::Cancelled) => drop(ret),
                Err(e) => ret.err(QmpError::generic(e.to_string())),
            }
        });
    })
}
