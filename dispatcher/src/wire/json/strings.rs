//! String tokens: the plain-body scan shared by the lexer, and decoding a token into its
//! value with QEMU's escape rules and error texts.

use super::utf8::{codepoint, is_valid_codepoint, lossy};

/// Bytes that end the plain part of a string body: controls, `"`, `\` and non-ASCII.
const fn plain_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0x20;
    while b < 0x80 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = false;
    t[b'\\' as usize] = false;
    t
}

static PLAIN: [bool; 256] = plain_table();

/// Length of the leading run of `s` made of printable ASCII other than `"` and `\`.
// Not inlined: its loop compiles best on its own, and it is called once per string.
#[inline(never)]
pub(super) fn plain_len(s: &[u8]) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    // Eight bytes at a time while the strings are long; the lowest flagged byte is exact
    // (borrows only propagate upwards from a byte that is itself flagged).
    for chunk in s.chunks_exact(8) {
        let w = u64::from_le_bytes([
            chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7],
        ]);
        let ctrl = w.wrapping_sub(LO * 0x20) & !w;
        let q = w ^ (LO * u64::from(b'"'));
        let bs = w ^ (LO * u64::from(b'\\'));
        let quote = q.wrapping_sub(LO) & !q;
        let backslash = bs.wrapping_sub(LO) & !bs;
        let hit = (ctrl | quote | backslash | w) & HI;
        if hit != 0 {
            return i + (hit.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < s.len() && PLAIN[s[i] as usize] {
        i += 1;
    }
    i
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

/// The value of a string token (with its quotes) whose body is plain: the body itself.
#[inline]
pub(super) fn decode_plain(tok: &[u8]) -> String {
    let body = &tok[1..tok.len().saturating_sub(1).max(1)];
    // Plain bodies are ASCII.
    String::from_utf8(body.to_vec()).unwrap_or_default()
}

/// [`decode_plain`] into a string held inline when short: a command name.
pub(super) fn decode_plain_compact(tok: &[u8]) -> compact_str::CompactString {
    let body = &tok[1..tok.len().saturating_sub(1).max(1)];
    compact_str::CompactString::from_utf8(body).unwrap_or_default()
}

/// Decodes a lexically valid string token (with its quotes) into its value, with QEMU's
/// escape rules and error texts.
pub(super) fn decode_string(tok: &[u8]) -> Result<String, String> {
    let body = &tok[1..tok.len().saturating_sub(1).max(1)];
    // Common case: plain ASCII without escapes is its own value.
    if plain_len(body) == body.len() {
        return Ok(decode_plain(tok));
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
