//! QEMU's view of (modified) UTF-8 and its string-literal rules.
//!
//! QEMU validates strings with its own decoder, which differs from Rust's: it accepts the
//! modified-UTF-8 NUL `C0 80` and rejects noncharacters (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF).
//! Error texts also depend on how many bytes one invalid sequence swallows, so this mirrors
//! that decoder's behaviour exactly.

use super::fast::plain_len;

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
    let ok = if cp > 0x10_FFFF
        || (0xFDD0..=0xFDEF).contains(&cp)
        || cp & 0xFFFE == 0xFFFE
        || (0xD800..=0xDFFF).contains(&cp)
    {
        false
    } else {
        // Overlong forms are invalid, except the modified-UTF-8 NUL `C0 80`.
        cp >= MIN_CP[len - 2] || (cp == 0 && len == 2)
    };
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

/// Four hex digits at `at`, or -1 if any is missing or not a hex digit (bytes past the end
/// of the token count as QEMU's terminating NUL).
fn hex4(tok: &[u8], at: usize) -> i64 {
    let mut cp = 0i64;
    for k in 0..4 {
        let Some(d) = tok.get(at + k).and_then(|&b| (b as char).to_digit(16)) else {
            return -1;
        };
        cp = (cp << 4) | i64::from(d);
    }
    cp
}

/// Decodes a lexically valid string token (with its quotes) into its value, with QEMU's
/// escape rules and error texts.
pub(super) fn decode_string(tok: &[u8]) -> Result<String, String> {
    let body = &tok[1..tok.len().saturating_sub(1).max(1)];
    // Common case: plain ASCII without escapes is its own value.
    if plain_len(body) == body.len() {
        if let Ok(s) = String::from_utf8(body.to_vec()) {
            return Ok(s);
        }
    }
    let quote = tok[0];
    let mut out = String::with_capacity(body.len());
    let mut i = 1;
    while i < tok.len() && tok[i] != quote {
        let b = tok[i];
        if b == b'\\' {
            let beg = i;
            let esc = tok.get(i + 1).copied().unwrap_or(0);
            i += 2;
            let c = match esc {
                b'"' => '"',
                b'\'' => '\'',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let mut cp = hex4(tok, i);
                    i += 4;
                    if (0xD800..=0xDBFF).contains(&cp)
                        && tok.get(i) == Some(&b'\\')
                        && tok.get(i + 1) == Some(&b'u')
                    {
                        let trail = hex4(tok, i + 2);
                        if (0xDC00..=0xDFFF).contains(&trail) {
                            cp = 0x1_0000 + ((cp & 0x3FF) << 10) + (trail & 0x3FF);
                            i += 6;
                        } else {
                            cp = -1;
                        }
                    }
                    let ch = if is_valid_codepoint(cp) {
                        u32::try_from(cp).ok().and_then(char::from_u32)
                    } else {
                        None
                    };
                    match ch {
                        Some(ch) => ch,
                        None => {
                            // QEMU quotes the escape text, cut at the end of the token.
                            let text = lossy(&tok[beg..i.min(tok.len())]);
                            return Err(format!(
                                "JSON parse error, {text} is not a valid Unicode character"
                            ));
                        }
                    }
                }
                _ => return Err("JSON parse error, invalid escape sequence in string".into()),
            };
            out.push(c);
        } else {
            let (cp, n) = codepoint(&tok[i..]);
            match cp.and_then(char::from_u32) {
                Some(ch) => out.push(ch),
                None => return Err("JSON parse error, invalid UTF-8 sequence in string".into()),
            }
            i += n;
        }
    }
    Ok(out)
}
