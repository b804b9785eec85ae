//! Framebuffer snapshots and a synthetic test display for screenshots.

use std::time::{Duration, Instant};

/// Bytes per RGB8 pixel.
const BYTES_PER_PIXEL: usize = 3;

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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn image_from_rgb_checks_length() {
        assert!(Image::from_rgb(2, 2, vec![0; 12]).is_some());
        assert!(Image::from_rgb(2, 2, vec![0; 11]).is_none());
        assert_eq!(Image::new(3, 2).pixels().len(), 18);
    }
}
