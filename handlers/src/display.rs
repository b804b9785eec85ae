//! Framebuffer snapshots, a synthetic test display and cancellable PPM/PNG image writing.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Bytes per RGB8 pixel.
const BYTES_PER_PIXEL: usize = 3;

/// Rows compressed between two cancellation checks while encoding a PNG.
const ROWS_PER_CHUNK: usize = 64;

/// A display a VMM can take screenshots of.
///
/// Implementations are called from a blocking worker thread, never from the
/// monitor thread, so [`Framebuffer::snapshot`] may take a lock or copy a
/// large buffer.
pub trait Framebuffer: Send + Sync {
    /// Current resolution as `(width, height)` in pixels.
    fn size(&self) -> (u32, u32);

    /// A consistent copy of the current frame: never half of one frame and
    /// half of the next.
    fn snapshot(&self) -> Image;
}

/// An RGB8 image: three bytes (red, green, blue) per pixel, rows stored top
/// to bottom without padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Image {
    /// A black image of the given size.
    ///
    /// # Panics
    ///
    /// If `width * height * 3` does not fit in `usize`.
    pub fn new(width: u32, height: u32) -> Self {
        let len = pixel_buffer_len(width, height).expect("image size overflows usize");
        Self {
            width,
            height,
            pixels: vec![0; len],
        }
    }

    /// Wraps an existing RGB8 buffer, or returns `None` if its length is not
    /// exactly `width * height * 3`.
    pub fn from_rgb(width: u32, height: u32, pixels: Vec<u8>) -> Option<Self> {
        (pixel_buffer_len(width, height) == Some(pixels.len())).then_some(Self {
            width,
            height,
            pixels,
        })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// All pixels, RGB8, row-major.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// All pixels for in-place drawing, RGB8, row-major.
    pub fn pixels_mut(&mut self) -> &mut [u8] {
        &mut self.pixels
    }

    /// Length in bytes of one row.
    pub fn row_len(&self) -> usize {
        self.width as usize * BYTES_PER_PIXEL
    }

    /// Gives the buffer back, e.g. to reuse its allocation.
    pub fn into_pixels(self) -> Vec<u8> {
        self.pixels
    }

    /// Rows grouped into chunks of at most `rows` rows; a zero-width image
    /// has no bytes and so no chunks.
    fn row_chunks(&self, rows: usize) -> std::slice::Chunks<'_, u8> {
        self.pixels.chunks((self.row_len() * rows).max(1))
    }
}

fn pixel_buffer_len(width: u32, height: u32) -> Option<usize> {
    (width as usize)
        .checked_mul(height as usize)?
        .checked_mul(BYTES_PER_PIXEL)
}

/// A synthetic display: colour bars, a scrolling grey ramp and a bouncing box
/// whose positions follow the wall clock, so screenshots taken at different
/// times differ.
#[derive(Debug, Clone)]
pub struct TestPattern {
    width: u32,
    height: u32,
    started: Instant,
}

impl TestPattern {
    /// Colour bars at 75% intensity, as on an analogue test card.
    const BARS: [[u8; 3]; 8] = [
        [191, 191, 191],
        [191, 191, 0],
        [0, 191, 191],
        [0, 191, 0],
        [191, 0, 191],
        [191, 0, 0],
        [0, 0, 191],
        [16, 16, 16],
    ];
    const BOX_COLOUR: [u8; 3] = [255, 128, 0];
    /// Time for the ramp to scroll by one full width.
    const RAMP_PERIOD_MS: u64 = 4_000;

    /// A test display of the given resolution whose animation starts now.
    ///
    /// # Panics
    ///
    /// If `width` or `height` is zero.
    pub fn new(width: u32, height: u32) -> Self {
        assert!(width > 0 && height > 0, "test display must not be empty");
        Self {
            width,
            height,
            started: Instant::now(),
        }
    }

    /// The frame shown `elapsed` after the display was created; a pure
    /// function of `elapsed`, so tests can render chosen moments.
    pub fn render_at(&self, elapsed: Duration) -> Image {
        let mut image = Image::new(self.width, self.height);
        let width = self.width as usize;
        let height = self.height as usize;
        let row_len = image.row_len();
        let millis = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);

        // Each band's rows are identical, so build one row and copy it down.
        let bars_end = height * 3 / 5;
        let ramp_end = height * 4 / 5;
        let mut bar_row = vec![0; row_len];
        for (x, pixel) in bar_row.chunks_exact_mut(BYTES_PER_PIXEL).enumerate() {
            pixel.copy_from_slice(&Self::BARS[x * Self::BARS.len() / width]);
        }
        let scroll =
            (millis % Self::RAMP_PERIOD_MS) as usize * width / Self::RAMP_PERIOD_MS as usize;
        let mut ramp_row = vec![0; row_len];
        for (x, pixel) in ramp_row.chunks_exact_mut(BYTES_PER_PIXEL).enumerate() {
            let level = ((x + scroll) % width * 256 / width) as u8;
            pixel.fill(level);
        }
        for (y, row) in image.pixels_mut().chunks_exact_mut(row_len).enumerate() {
            if y < bars_end {
                row.copy_from_slice(&bar_row);
            } else if y < ramp_end {
                row.copy_from_slice(&ramp_row);
            }
            // The bottom band stays black as a background for the box.
        }

        // Crossing the screen takes 5 s horizontally and 4 s vertically, so
        // the box visits every region rather than tracing one diagonal.
        let box_width = (width / 8).max(1);
        let box_height = (height / 8).max(1);
        let left = bounce(millis, width - box_width, 5_000);
        let top = bounce(millis, height - box_height, 4_000);
        for row in image
            .pixels_mut()
            .chunks_exact_mut(row_len)
            .skip(top)
            .take(box_height)
        {
            let span = &mut row[left * BYTES_PER_PIXEL..(left + box_width) * BYTES_PER_PIXEL];
            for pixel in span.chunks_exact_mut(BYTES_PER_PIXEL) {
                pixel.copy_from_slice(&Self::BOX_COLOUR);
            }
        }
        image
    }
}

impl Default for TestPattern {
    /// A 1920x1080 test display.
    fn default() -> Self {
        Self::new(1920, 1080)
    }
}

impl Framebuffer for TestPattern {
    fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    fn snapshot(&self) -> Image {
        self.render_at(self.started.elapsed())
    }
}

/// Position in `0..=travel` moving back and forth, one way per `crossing_ms`.
fn bounce(millis: u64, travel: usize, crossing_ms: u64) -> usize {
    if travel == 0 {
        return 0;
    }
    let phase = millis % (2 * crossing_ms);
    let distance = phase.min(2 * crossing_ms - phase);
    (distance as u128 * travel as u128 / crossing_ms as u128) as usize
}

/// File format of a screenshot, named as in QEMU's `screendump` `format`
/// argument (`"ppm"` or `"png"`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Binary portable pixmap (P6), QEMU's default.
    #[default]
    Ppm,
    /// PNG, 8-bit RGB.
    Png,
}

/// Why [`write_image`] did not produce a file.
///
/// `Display` gives the text meant for the `desc` of a QMP error reply.
#[derive(Debug)]
#[non_exhaustive]
pub enum DumpError {
    /// The caller's `cancelled` callback returned `true`.
    Cancelled,
    /// The file could not be created or written; holds the full message,
    /// ending with the operating system's reason.
    Io(String),
    /// The PNG encoder rejected the image (for example a zero-sized one).
    Encode(String),
}

impl fmt::Display for DumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DumpError::Cancelled => f.write_str("Screendump cancelled"),
            DumpError::Io(message) | DumpError::Encode(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for DumpError {}

/// An encoded image, ready to be written out in chunks.
#[derive(Debug)]
pub struct Encoded {
    /// Written first: the PPM header (a PNG has none apart from its body).
    header: Vec<u8>,
    body: Vec<u8>,
}

impl Encoded {
    /// Length in bytes of the whole file.
    pub fn len(&self) -> usize {
        self.header.len() + self.body.len()
    }

    /// True for an empty encoding (never produced by [`encode`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in the order they go to the file, in pieces of at most [`WRITE_CHUNK`]
    /// bytes: a writer checks for cancellation between two of them.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.header.as_slice())
            .filter(|header| !header.is_empty())
            .chain(self.body.chunks(WRITE_CHUNK))
    }
}

/// Largest piece [`Encoded::chunks`] yields: 64 rows of a 1920-pixel frame, so a 1080-row
/// frame goes out in 17 pieces and a cancel request is noticed within a millisecond or so.
pub const WRITE_CHUNK: usize = 64 * 1920 * BYTES_PER_PIXEL;

/// Encodes `image` as `format` in memory. CPU-bound: meant for a blocking thread.
///
/// `cancelled` is polled between chunks of rows while compressing a PNG; once it returns
/// `true` encoding stops with [`DumpError::Cancelled`]. A PPM takes the pixels as they are.
pub fn encode(
    image: Image,
    format: ImageFormat,
    cancelled: &dyn Fn() -> bool,
) -> Result<Encoded, DumpError> {
    match format {
        ImageFormat::Ppm => Ok(Encoded {
            header: format!("P6\n{} {}\n255\n", image.width, image.height).into_bytes(),
            body: image.into_pixels(),
        }),
        ImageFormat::Png => {
            // The test pattern compresses to a few percent; real screens rarely exceed half.
            let mut body = Vec::with_capacity(image.pixels.len() / 8);
            encode_png(&image, &mut body, cancelled)?;
            Ok(Encoded {
                header: Vec::new(),
                body,
            })
        }
    }
}

/// Writes `image` to `path` as `format`, creating or truncating the file: [`encode`] and
/// [`write_encoded`] on the calling thread, for embedders without an async runtime.
///
/// `cancelled` is polled before the file is created, while encoding and between chunks;
/// once it returns `true` writing stops. On cancellation or any error the partially written
/// file is removed (unless `path` is not a regular file, e.g. a device node), so a failed
/// call leaves no truncated image behind.
///
/// Error texts follow QEMU 10.0: `failed to open file '<path>': <reason>` when the file
/// cannot be created, `Unable to write to file: <reason>` when writing fails.
pub fn write_image(
    image: &Image,
    format: ImageFormat,
    path: &Path,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), DumpError> {
    if cancelled() {
        return Err(DumpError::Cancelled);
    }
    let mut file = File::create(path).map_err(|error| open_error(path, &error))?;
    // Only a regular file we just created or truncated is ours to delete.
    let removable = file.metadata().is_ok_and(|metadata| metadata.is_file());
    let result = encode(image.clone(), format, cancelled)
        .and_then(|encoded| write_encoded(&encoded, &mut file, cancelled));
    drop(file);
    if result.is_err() && removable {
        remove_partial(path);
    }
    result
}

/// Writes `encoded` to `out` chunk by chunk, polling `cancelled` before each chunk.
pub fn write_encoded(
    encoded: &Encoded,
    out: &mut impl Write,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), DumpError> {
    for chunk in encoded.chunks() {
        if cancelled() {
            return Err(DumpError::Cancelled);
        }
        out.write_all(chunk).map_err(write_error)?;
    }
    out.flush().map_err(write_error)
}

/// Removes an image file that must not be left behind (partial, or cancelled).
pub fn remove_partial(path: &Path) {
    if let Err(error) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), %error, "could not remove partial image file");
    }
}

/// QEMU's text for a file `screendump` cannot open.
pub fn open_error(path: &Path, error: &io::Error) -> DumpError {
    DumpError::Io(format!(
        "failed to open file '{}': {}",
        path.display(),
        os_error_text(error)
    ))
}

fn encode_png(
    image: &Image,
    out: impl Write,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), DumpError> {
    let mut encoder = png::Encoder::new(out, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Screenshots are taken interactively: speed matters more than size.
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().map_err(png_error)?;
    {
        let mut stream = writer.stream_writer().map_err(png_error)?;
        for chunk in image.row_chunks(ROWS_PER_CHUNK) {
            if cancelled() {
                return Err(DumpError::Cancelled);
            }
            stream.write_all(chunk).map_err(write_error)?;
        }
        stream.finish().map_err(png_error)?;
    }
    // Writes IEND, reporting errors that a plain drop would swallow.
    writer.finish().map_err(png_error)
}

/// QEMU's text for a write that failed.
pub fn write_error(error: io::Error) -> DumpError {
    DumpError::Io(format!(
        "Unable to write to file: {}",
        os_error_text(&error)
    ))
}

fn png_error(error: png::EncodingError) -> DumpError {
    match error {
        png::EncodingError::IoError(error) => write_error(error),
        other => DumpError::Encode(format!("PNG encoding failed: {other}")),
    }
}

/// The bare `strerror`-style reason, as QEMU prints it: Rust appends
/// " (os error N)" to OS errors, which QMP clients would not expect.
fn os_error_text(error: &io::Error) -> String {
    let text = error.to_string();
    match error.raw_os_error() {
        Some(code) => match text.strip_suffix(&format!(" (os error {code})")) {
            Some(reason) => reason.to_owned(),
            None => text,
        },
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A path in the temp directory unique to this process and call; the file
    /// is deleted when the guard drops, even if the test fails.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(extension: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "qmp-handlers-display-{}-{}.{extension}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            Self(std::env::temp_dir().join(name))
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn never() -> bool {
        false
    }

    #[test]
    fn ppm_has_exact_header_and_size() {
        let image = TestPattern::default().snapshot();
        let path = TempPath::new("ppm");
        write_image(&image, ImageFormat::Ppm, &path.0, &never).unwrap();

        let bytes = std::fs::read(&path.0).unwrap();
        let header = b"P6\n1920 1080\n255\n";
        assert_eq!(&bytes[..header.len()], header);
        assert_eq!(bytes.len(), header.len() + 1920 * 1080 * 3);
        assert_eq!(&bytes[header.len()..], image.pixels());
    }

    #[test]
    fn png_decodes_to_the_snapshot() {
        let image = TestPattern::default().snapshot();
        let path = TempPath::new("png");
        write_image(&image, ImageFormat::Png, &path.0, &never).unwrap();

        let decoder = png::Decoder::new(io::BufReader::new(File::open(&path.0).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut decoded = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut decoded).unwrap();
        assert_eq!((frame.width, frame.height), (1920, 1080));
        assert_eq!(frame.color_type, png::ColorType::Rgb);
        assert_eq!(frame.bit_depth, png::BitDepth::Eight);
        assert!(decoded[..frame.buffer_size()] == *image.pixels());
    }

    #[test]
    fn snapshots_taken_apart_differ() {
        let display = TestPattern::default();
        let first = display.snapshot();
        std::thread::sleep(Duration::from_millis(60));
        let second = display.snapshot();
        assert_eq!(display.size(), (first.width(), first.height()));
        assert_ne!(first, second);
    }

    #[test]
    fn rendering_depends_only_on_elapsed_time() {
        let display = TestPattern::new(320, 200);
        let at = Duration::from_millis(1234);
        assert_eq!(display.render_at(at), display.render_at(at));
        assert_ne!(
            display.render_at(at),
            display.render_at(at + Duration::from_millis(100))
        );
    }

    #[test]
    fn cancellation_after_first_chunk_removes_file() {
        let image = TestPattern::default().snapshot();
        for format in [ImageFormat::Ppm, ImageFormat::Png] {
            let path = TempPath::new("partial");
            let checks = Cell::new(0);
            let partial_file_seen = Cell::new(false);
            // The first check happens before the file is created, the second
            // before chunk one; cancel at the third, once a chunk is written.
            let cancelled = || {
                checks.set(checks.get() + 1);
                if checks.get() == 3 {
                    partial_file_seen.set(path.0.exists());
                }
                checks.get() >= 3
            };
            let result = write_image(&image, format, &path.0, &cancelled);
            assert!(matches!(result, Err(DumpError::Cancelled)), "{format:?}");
            assert!(partial_file_seen.get(), "{format:?}");
            assert!(!path.0.exists(), "{format:?}: partial file left behind");
        }
    }

    #[test]
    fn cancelled_before_start_creates_no_file() {
        let path = TempPath::new("ppm");
        let result = write_image(&Image::new(4, 4), ImageFormat::Ppm, &path.0, &|| true);
        assert!(matches!(result, Err(DumpError::Cancelled)));
        assert!(!path.0.exists());
    }

    #[test]
    fn unopenable_path_gives_qemu_style_error() {
        let path = std::env::temp_dir()
            .join(format!("qmp-handlers-missing-dir-{}", std::process::id()))
            .join("x.ppm");
        let error = write_image(&Image::new(2, 2), ImageFormat::Ppm, &path, &never).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "failed to open file '{}': No such file or directory",
                path.display()
            )
        );
    }

    #[test]
    fn write_failure_reports_reason_without_os_error_suffix() {
        struct DiskFull;
        impl Write for DiskFull {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(28))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let encoded = encode(Image::new(2, 2), ImageFormat::Ppm, &never).unwrap();
        let error = write_encoded(&encoded, &mut DiskFull, &never).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Unable to write to file: No space left on device"
        );
    }

    #[test]
    fn format_deserializes_from_qmp_names() {
        let parse = |json| serde_json::from_str::<ImageFormat>(json).unwrap();
        assert_eq!(parse("\"ppm\""), ImageFormat::Ppm);
        assert_eq!(parse("\"png\""), ImageFormat::Png);
        assert!(serde_json::from_str::<ImageFormat>("\"PNG\"").is_err());
        assert_eq!(ImageFormat::default(), ImageFormat::Ppm);
    }

    #[test]
    fn image_from_rgb_checks_length() {
        assert!(Image::from_rgb(2, 2, vec![0; 12]).is_some());
        assert!(Image::from_rgb(2, 2, vec![0; 11]).is_none());
        assert_eq!(Image::new(3, 2).pixels().len(), 18);
    }

    /// Release-mode timing, run by hand:
    /// `cargo test -p qmp-handlers --release -- --ignored --nocapture write_timing`
    #[test]
    #[ignore = "timing report, not a check"]
    fn write_timing() {
        let display = TestPattern::default();
        let started = Instant::now();
        let image = display.snapshot();
        eprintln!("render 1920x1080: {:?}", started.elapsed());
        for format in [ImageFormat::Ppm, ImageFormat::Png] {
            let path = TempPath::new("timing");
            let started = Instant::now();
            write_image(&image, format, &path.0, &never).unwrap();
            let elapsed = started.elapsed();
            let size = std::fs::metadata(&path.0).unwrap().len();
            eprintln!("{format:?} 1920x1080: {elapsed:?}, {size} bytes");
        }
    }
}
