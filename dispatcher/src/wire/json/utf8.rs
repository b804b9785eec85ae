//! QEMU's view of (modified) UTF-8.
//!
//! QEMU validates strings with its own decoder, which differs from Rust's: it accepts the
//! modified-UTF-8 NUL `C0 80` and rejects noncharacters (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF).
//! Error texts also depend on how many bytes one invalid sequence swallows, so this mirrors
//! that decoder's behaviour exactly.

/// Smallest code point for a sequence of 2..=6 bytes; smaller ones are overlong.
const MIN_CP: [u32; 5] = [0x80, 0x800, 0x1_0000, 0x20_0000, 0x400_0000];

/// True for code points QEMU accepts in strings (no surrogates, no noncharacters).
pub(super) fn is_valid_codepoint(cp: i64) -> bool {
    (0..=0x10_FFFF).contains(&cp)
        && !(0xFDD0..=0xFDEF).contains(&cp)
        && (cp & 0xFFFE) != 0xFFFE
        && !(0xD800..=0xDFFF).contains(&cp)
}

/// Decodes one code point from the start of `s` (non-empty). Returns the code point, or
/// `None` when invalid, plus the number of bytes consumed (at least 1). A missing
/// continuation byte is not consumed, so it is examined again as the next sequence.
pub(super) fn codepoint(s: &[u8]) -> (Option<u32>, usize) {
    let lead = s[0];
    if lead < 0x80 {
        return (Some(u32::from(lead)), 1);
    }
    if lead >= 0xFE || lead & 0x40 == 0 {
        return (None, 1);
    }
    let mut len = 0usize;
    let mut mask = 0x80u8;
    while lead & mask != 0 {
        len += 1;
        mask >>= 1;
    }
    let mut cp = u32::from(lead & mask.wrapping_sub(1));
    let mut used = 1;
    for _ in 1..len {
        let byte = s.get(used).copied().unwrap_or(0);
        if byte & 0xC0 != 0x80 {
            return (None, used);
        }
        used += 1;
        cp = (cp << 6) | u32::from(byte & 0x3F);
    }
    // Overlong forms are invalid, except the modified-UTF-8 NUL `C0 80`.
    let ok = is_valid_codepoint(i64::from(cp)) && (cp >= MIN_CP[len - 2] || (cp == 0 && len == 2));
    (ok.then_some(cp), used)
}

/// Converts bytes the way QEMU's JSON writer would print them: the text is cut at the
/// first NUL (it is a C string), and every invalid sequence becomes U+FFFD.
pub(super) fn lossy(bytes: &[u8]) -> String {
    let bytes = match bytes.iter().position(|&b| b == 0) {
        Some(n) => &bytes[..n],
        None => bytes,
    };
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let (cp, n) = codepoint(&bytes[i..]);
        out.push(cp.and_then(char::from_u32).unwrap_or('\u{FFFD}'));
        i += n;
    }
    out
}
