//! The targeted edit of a chat request's top-level `"model"` value.
//!
//! Switching model must not parse and re-serialise a request body that may be
//! megabytes of conversation: that costs time, allocates a tree, and can change the
//! bytes the caller sent (number formatting, key order, escapes). Instead one pass
//! over the bytes validates the JSON, finds the top-level `model` member, and one
//! splice writes a new buffer of exactly the right size: prefix, the new escaped
//! string, suffix.
//!
//! # What is accepted
//!
//! The whole document is validated against the JSON grammar (RFC 8259), nested
//! values included, so a body is accepted exactly when `serde_json` would parse it
//! into a `serde_json::Value` (the property tests check this on random and damaged
//! bodies), with one deliberate difference and one corner:
//!
//! - a top-level `model` key that appears twice is rejected
//!   ([`RewriteError::DuplicateModel`]); `serde_json::Value` keeps the last one.
//!   Different parsers pick different duplicates, so sending such a body on would let
//!   the provider serve another model than the one this layer routed;
//! - a number that overflows an `f64` (`1e400`) is refused, as `serde_json` refuses
//!   it; the check uses the standard library's correctly rounded conversion, so a
//!   number within half an ulp of `f64::MAX` may be judged differently from
//!   `serde_json`'s faster, slightly inexact one.
//!
//! Strings must be valid UTF-8 with no raw control characters; `\u` escapes must pair
//! surrogates (as `serde_json` requires). Nesting is limited to 127 levels, the
//! depth at which `serde_json` stops. Keys are compared after decoding escapes, so
//! `"mod\u0065l"` is the model key; `model` keys nested inside messages or tools are
//! never touched.
//!
//! The scan allocates nothing; the rewrite allocates the output buffer once.
//!
//! # How it is fast
//!
//! Most bytes of a chat body are message text inside strings, and a string scan
//! only has to stop at a quote, a backslash, a control character or a non-ASCII
//! byte. The scanner classifies the body 64 bytes at a time into a bitmask of those
//! bytes (four 16-byte SSE2 compares and a move-mask each, through the `wide`
//! crate, so this crate stays free of `unsafe`), keeps the mask from one string to
//! the next, and jumps from one marked byte to the next with a trailing-zero count.
//! Text with an escape every few bytes then costs one shift per escape instead of
//! a new search, and plain text costs nothing per byte. UTF-8 is checked one
//! character at a time, only at non-ASCII bytes. The grammar outside strings is
//! checked byte by byte: it is a small share of a chat body.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use wide::u8x16;

/// Why a body's model could not be read or rewritten. The body itself is never
/// modified: a failed rewrite leaves the caller's bytes as they were.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RewriteError {
    /// The body is not valid JSON; `offset` is the byte where parsing failed.
    Malformed {
        /// Byte offset of the first byte that does not fit the JSON grammar.
        offset: usize,
    },
    /// The body is JSON, but its top-level value is not an object.
    NotAnObject,
    /// The top-level object has no `model` member.
    NoModelField,
    /// The top-level `model` member is not a string.
    ModelNotAString,
    /// The top-level object names `model` more than once.
    DuplicateModel,
    /// The body (or the rewritten body) is larger than the limit.
    TooLarge {
        /// The size that was refused, in bytes.
        len: usize,
        /// The limit, in bytes.
        limit: usize,
    },
}

impl fmt::Display for RewriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RewriteError::Malformed { offset } => write!(
                f,
                "request body is not valid JSON (error at byte {offset}); send a JSON chat request"
            ),
            RewriteError::NotAnObject => f.write_str(
                "request body is JSON but not an object; a chat request is an object with a \"model\" member",
            ),
            RewriteError::NoModelField => f.write_str(
                "request body has no top-level \"model\" member; add one so the fallback chain can be chosen",
            ),
            RewriteError::ModelNotAString => {
                f.write_str("the top-level \"model\" member is not a string; send the model name as a JSON string")
            }
            RewriteError::DuplicateModel => f.write_str(
                "the top-level \"model\" member appears more than once; send it once so every parser reads the same model",
            ),
            RewriteError::TooLarge { len, limit } => write!(
                f,
                "request body of {len} bytes exceeds the {limit}-byte rewrite limit; raise `max_body_bytes` or send smaller requests"
            ),
        }
    }
}

impl std::error::Error for RewriteError {}

/// Where the top-level `model` string sits in a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSpan {
    /// Offset of the opening quote of the value.
    pub start: usize,
    /// Offset just past the closing quote of the value.
    pub end: usize,
    /// Whether the value contains a backslash escape (so it must be decoded to read it).
    pub escaped: bool,
}

/// Validates `body` and finds its top-level `model` string.
pub fn locate_model(body: &[u8]) -> Result<ModelSpan, RewriteError> {
    Scanner::new(body).scan()
}

/// Reads the top-level `model` of a JSON request body (borrowed unless it had escapes).
pub fn read_model(body: &[u8]) -> Result<Cow<'_, str>, RewriteError> {
    let span = locate_model(body)?;
    Ok(decode_string(body, span))
}

/// Returns a copy of `body` with the top-level `model` value replaced by `model`
/// (JSON-escaped), built in one allocation of exactly the output's size.
///
/// `limit` caps both the input and the output size.
pub fn rewrite_model(body: &[u8], model: &str, limit: usize) -> Result<Bytes, RewriteError> {
    if body.len() > limit {
        return Err(RewriteError::TooLarge {
            len: body.len(),
            limit,
        });
    }
    let span = locate_model(body)?;
    Ok(Bytes::from(splice(body, span, model, limit)?))
}

/// Writes `body` with the string at `span` replaced by `model`, in one buffer of
/// exact capacity.
pub(crate) fn splice(
    body: &[u8],
    span: ModelSpan,
    model: &str,
    limit: usize,
) -> Result<Vec<u8>, RewriteError> {
    let value_len = escaped_len(model) + 2;
    let len = body.len() - (span.end - span.start) + value_len;
    if len > limit {
        return Err(RewriteError::TooLarge { len, limit });
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&body[..span.start]);
    out.push(b'"');
    write_escaped(&mut out, model);
    out.push(b'"');
    out.extend_from_slice(&body[span.end..]);
    debug_assert_eq!(out.len(), len);
    debug_assert_eq!(out.capacity(), len);
    Ok(out)
}

/// The model string at `span`, decoded.
pub(crate) fn decode_string(body: &[u8], span: ModelSpan) -> Cow<'_, str> {
    let raw = &body[span.start + 1..span.end - 1];
    // The scanner validated UTF-8 and escapes; these conversions cannot fail, but a
    // lossy fallback keeps this path panic-free whatever happens.
    if !span.escaped {
        return String::from_utf8_lossy(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = Unescape::new(raw);
    while let Some(c) = chars.next_char() {
        out.push(c);
    }
    Cow::Owned(out)
}

fn escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

fn write_escaped(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in s.bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x00..=0x1f => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]),
            _ => out.push(b),
        }
    }
}

/// The bytes that complete a two-byte escape after a backslash.
const SHORT_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let short = *b"\"\\/bfnrt";
    let mut k = 0;
    while k < short.len() {
        table[short[k] as usize] = true;
        k += 1;
    }
    table
};

/// `serde_json` refuses a document nested deeper than this (its recursion limit).
const MAX_DEPTH: u32 = 127;

/// An iterative, allocation-free JSON validator that remembers the top-level
/// `model` member. Container kinds are kept in a 128-bit stack (1 = array), which is
/// why nesting is bounded without recursion or a heap.
struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    /// Start of the 64-byte window whose string-special bytes `window` marks.
    window_start: usize,
    /// Bit k set when byte `window_start + k` is `"`, `\\`, a control character
    /// or non-ASCII (or past the end of the body). A pure classification of
    /// bytes, so it stays valid from one string to the next.
    window: u64,
}

type ScanResult<T> = Result<T, RewriteError>;

impl<'a> Scanner<'a> {
    fn new(b: &'a [u8]) -> Self {
        Scanner {
            b,
            i: 0,
            window_start: 0,
            window: special_mask(b, 0),
        }
    }

    fn err<T>(&self) -> ScanResult<T> {
        Err(RewriteError::Malformed { offset: self.i })
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if !matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                break;
            }
            self.i += 1;
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn scan(mut self) -> ScanResult<ModelSpan> {
        self.skip_ws();
        match self.peek() {
            Some(b'{') => {}
            None => return self.err(),
            Some(_) => {
                // Validate the whole value first: a malformed body is Malformed,
                // whatever its first byte.
                self.value()?;
                self.skip_ws();
                if self.i != self.b.len() {
                    return self.err();
                }
                return Err(RewriteError::NotAnObject);
            }
        }
        self.i += 1;
        let mut model: Option<ModelSpan> = None;
        let mut model_not_string = false;
        let mut duplicate = false;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
        } else {
            loop {
                self.skip_ws();
                if self.peek() != Some(b'"') {
                    return self.err();
                }
                let key_start = self.i;
                let key_escaped = self.string()?;
                let is_model = key_is_model(&self.b[key_start + 1..self.i - 1], key_escaped);
                self.skip_ws();
                if self.peek() != Some(b':') {
                    return self.err();
                }
                self.i += 1;
                self.skip_ws();
                let value_start = self.i;
                if is_model {
                    if model.is_some() || model_not_string {
                        duplicate = true;
                    }
                    if self.peek() == Some(b'"') {
                        let escaped = self.string()?;
                        model = Some(ModelSpan {
                            start: value_start,
                            end: self.i,
                            escaped,
                        });
                    } else {
                        self.value()?;
                        model_not_string = true;
                    }
                } else {
                    self.value()?;
                }
                self.skip_ws();
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(b'}') => {
                        self.i += 1;
                        break;
                    }
                    _ => return self.err(),
                }
            }
        }
        self.skip_ws();
        if self.i != self.b.len() {
            return self.err();
        }
        if duplicate {
            return Err(RewriteError::DuplicateModel);
        }
        if model_not_string {
            return Err(RewriteError::ModelNotAString);
        }
        model.ok_or(RewriteError::NoModelField)
    }

    /// Validates one value of any kind starting at the current byte (no leading
    /// whitespace), iteratively.
    fn value(&mut self) -> ScanResult<()> {
        // Bit d of `kinds` is 1 when the container at depth d+1 is an array.
        let mut kinds: u128 = 0;
        let mut depth: u32 = 0;
        loop {
            // Expecting a value here.
            match self.peek() {
                Some(b'"') => {
                    self.string()?;
                }
                Some(b'{') | Some(b'[') => {
                    let is_array = self.peek() == Some(b'[');
                    if depth + 1 >= MAX_DEPTH {
                        return self.err();
                    }
                    self.i += 1;
                    if is_array {
                        kinds |= 1 << depth;
                    } else {
                        kinds &= !(1 << depth);
                    }
                    depth += 1;
                    self.skip_ws();
                    let close = if is_array { b']' } else { b'}' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                        depth -= 1;
                    } else {
                        if !is_array {
                            self.member_key()?;
                        }
                        continue;
                    }
                }
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                _ => return self.err(),
            }
            // After a value: close containers or move to the next element.
            loop {
                if depth == 0 {
                    return Ok(());
                }
                let is_array = kinds & (1 << (depth - 1)) != 0;
                self.skip_ws();
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        self.skip_ws();
                        if !is_array {
                            self.member_key()?;
                        }
                        break;
                    }
                    Some(b']') if is_array => {
                        self.i += 1;
                        depth -= 1;
                    }
                    Some(b'}') if !is_array => {
                        self.i += 1;
                        depth -= 1;
                    }
                    _ => return self.err(),
                }
            }
        }
    }

    /// `"key"` `:` and the whitespace before the value.
    fn member_key(&mut self) -> ScanResult<()> {
        if self.peek() != Some(b'"') {
            return self.err();
        }
        self.string()?;
        self.skip_ws();
        if self.peek() != Some(b':') {
            return self.err();
        }
        self.i += 1;
        self.skip_ws();
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> ScanResult<()> {
        for &w in word {
            if self.peek() != Some(w) {
                return self.err();
            }
            self.i += 1;
        }
        Ok(())
    }

    fn number(&mut self) -> ScanResult<()> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return self.err(),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return self.err();
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return self.err();
            }
            self.digits();
            return self.in_f64_range(start);
        }
        if self.i - start > 300 {
            return self.in_f64_range(start);
        }
        Ok(())
    }

    /// `serde_json` refuses a number that overflows an `f64` (`1e400`); only numbers
    /// with an exponent or hundreds of digits can, so only those are converted.
    #[cold]
    fn in_f64_range(&self, start: usize) -> ScanResult<()> {
        let text = std::str::from_utf8(&self.b[start..self.i]).unwrap_or("inf");
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(()),
            _ => Err(RewriteError::Malformed { offset: start }),
        }
    }

    #[inline]
    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
    }

    /// The offset, at or after `i`, of the first byte a string scan must look at
    /// (`b.len()` or beyond at the end of the body). Reads the bitmask of the
    /// current 64-byte window and builds the next one only when this one has no
    /// more hits, so text with an escape every few bytes costs a shift and a
    /// trailing-zero count per escape rather than a new search.
    #[inline(always)]
    fn next_special(&mut self, mut i: usize) -> usize {
        loop {
            // The scan only moves forward, so `i` is not before the window; if it
            // ever were, the window is simply built again at `i`.
            if let Some(offset @ 0..64) = i.checked_sub(self.window_start) {
                let ahead = self.window >> offset;
                if ahead != 0 {
                    return i + ahead.trailing_zeros() as usize;
                }
                // Nothing special in the rest of this window: go to the next one.
                i = self.window_start + 64;
            }
            self.window_start = i;
            self.window = special_mask(self.b, i);
        }
    }

    /// Validates a string starting at its opening quote; leaves `i` past the closing
    /// quote. Returns whether it contained an escape.
    ///
    /// Most bytes of a chat body are message text, so this loop is the scan's cost:
    /// it works on a local index and jumps from one byte that needs a look to the
    /// next (see [`Scanner::next_special`]); ordinary text costs nothing per byte.
    fn string(&mut self) -> ScanResult<bool> {
        let b = self.b;
        let mut i = self.i + 1;
        let mut escaped = false;
        loop {
            i = self.next_special(i);
            match b.get(i) {
                Some(b'"') => {
                    self.i = i + 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    // The two-byte escapes inline, by one table look-up rather than a
                    // branch per letter (which the branch predictor kept missing in
                    // code-heavy text); \u and errors out of line.
                    if b.get(i + 1).is_some_and(|&c| SHORT_ESCAPE[usize::from(c)]) {
                        i += 2;
                    } else {
                        self.i = i;
                        self.escape()?;
                        i = self.i;
                    }
                }
                // UTF-8 is checked here, one character at a time, only where a byte is
                // non-ASCII: outside strings every byte must be an ASCII token, so this
                // checks the whole body without a separate pass. Non-Latin text is
                // non-ASCII character after character: stay here while it lasts.
                Some(0x80..=0xff) => loop {
                    match b.get(i..).and_then(utf8_width) {
                        Some(width) => i += width,
                        None => {
                            self.i = i;
                            return self.err();
                        }
                    }
                    if !matches!(b.get(i), Some(0x80..=0xff)) {
                        break;
                    }
                },
                // A raw control character, or the end of input inside a string.
                _ => {
                    self.i = i;
                    return self.err();
                }
            }
        }
    }

    /// Validates one escape starting at its backslash.
    fn escape(&mut self) -> ScanResult<()> {
        self.i += 1;
        match self.peek() {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                self.i += 1;
                Ok(())
            }
            Some(b'u') => {
                self.i += 1;
                let unit = self.hex4()?;
                match unit {
                    0xD800..=0xDBFF => {
                        // A leading surrogate must be followed by an escaped trailing one.
                        if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
                            return self.err();
                        }
                        self.i += 2;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return self.err();
                        }
                        Ok(())
                    }
                    0xDC00..=0xDFFF => self.err(),
                    _ => Ok(()),
                }
            }
            _ => self.err(),
        }
    }

    fn hex4(&mut self) -> ScanResult<u16> {
        let mut v: u16 = 0;
        for _ in 0..4 {
            let d = match self.peek().and_then(hex_digit) {
                Some(d) => d,
                None => return self.err(),
            };
            v = (v << 4) | d as u16;
            self.i += 1;
        }
        Ok(v)
    }
}

#[inline]
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The string-special bytes of `b[start..start + 64]` as a bitmask (bit k for byte
/// `start + k`): `"`, `\\`, control characters and non-ASCII bytes. Bytes past the
/// end of `b` count as special, so a scan always stops at the end.
#[inline]
fn special_mask(b: &[u8], start: usize) -> u64 {
    match b
        .get(start..start + 64)
        .and_then(|w| <&[u8; 64]>::try_from(w).ok())
    {
        Some(window) => window_special_mask(window),
        None => last_special_mask(b, start),
    }
}

/// [`special_mask`] for the last, partial window: zero padding is a control
/// character, hence special.
#[cold]
fn last_special_mask(b: &[u8], start: usize) -> u64 {
    let mut padded = [0u8; 64];
    let rest = b.get(start..).unwrap_or_default();
    padded[..rest.len()].copy_from_slice(rest);
    window_special_mask(&padded)
}

#[inline(always)]
fn window_special_mask(window: &[u8; 64]) -> u64 {
    let mut mask = 0u64;
    for (k, block) in window.chunks_exact(16).enumerate() {
        if let Ok(block) = <[u8; 16]>::try_from(block) {
            mask |= u64::from(block_special_mask(block)) << (16 * k);
        }
    }
    mask
}

/// Bit k set when `block[k]` is `"`, `\\`, below 0x20 or non-ASCII: a few SSE2
/// (or NEON, or scalar elsewhere) operations through `wide`, which keeps the
/// `unsafe` of the intrinsics out of this crate.
#[inline(always)]
fn block_special_mask(block: [u8; 16]) -> u16 {
    let v = u8x16::new(block);
    let control = v.min(u8x16::splat(0x1f)).cmp_eq(v);
    let marked = v.cmp_eq(u8x16::splat(b'"')) | v.cmp_eq(u8x16::splat(b'\\')) | control | v;
    // The top bit of each lane: set by the compares, and by non-ASCII bytes in `v`.
    marked.move_mask() as u16
}

/// The length of the valid UTF-8 character starting `s` (whose first byte is
/// non-ASCII), or `None` when it is not one (RFC 3629: no overlong forms, no
/// surrogates, nothing above U+10FFFF).
#[inline]
fn utf8_width(s: &[u8]) -> Option<usize> {
    let cont = |k: usize| matches!(s.get(k), Some(0x80..=0xbf));
    let second_in = |lo: u8, hi: u8| s.get(1).is_some_and(|&b| (lo..=hi).contains(&b));
    match *s.first()? {
        0xc2..=0xdf if cont(1) => Some(2),
        0xe0 if second_in(0xa0, 0xbf) && cont(2) => Some(3),
        0xe1..=0xec | 0xee..=0xef if cont(1) && cont(2) => Some(3),
        0xed if second_in(0x80, 0x9f) && cont(2) => Some(3),
        0xf0 if second_in(0x90, 0xbf) && cont(2) && cont(3) => Some(4),
        0xf1..=0xf3 if cont(1) && cont(2) && cont(3) => Some(4),
        0xf4 if second_in(0x80, 0x8f) && cont(2) && cont(3) => Some(4),
        _ => None,
    }
}

/// Whether a (validated) key's raw bytes spell `model` once escapes are decoded.
fn key_is_model(raw: &[u8], escaped: bool) -> bool {
    if !escaped {
        return raw == b"model";
    }
    // Compare while decoding: no allocation, and a long key stops at its 6th char.
    let mut chars = Unescape::new(raw);
    for expected in "model".chars() {
        if chars.next_char() != Some(expected) {
            return false;
        }
    }
    chars.next_char().is_none()
}

/// Decodes the characters of a validated JSON string's contents.
struct Unescape<'a> {
    raw: &'a [u8],
    i: usize,
}

impl<'a> Unescape<'a> {
    fn new(raw: &'a [u8]) -> Self {
        Unescape { raw, i: 0 }
    }

    fn hex4_at(&self, at: usize) -> Option<u32> {
        let mut v = 0u32;
        for k in 0..4 {
            v = (v << 4) | hex_digit(*self.raw.get(at + k)?)? as u32;
        }
        Some(v)
    }

    fn next_char(&mut self) -> Option<char> {
        let rest = self.raw.get(self.i..)?;
        let &first = rest.first()?;
        if first != b'\\' {
            // Decode one UTF-8 character (the input was validated as UTF-8).
            let width = match first {
                0x00..=0x7f => 1,
                0xc0..=0xdf => 2,
                0xe0..=0xef => 3,
                _ => 4,
            };
            let c = std::str::from_utf8(rest.get(..width)?)
                .ok()?
                .chars()
                .next()?;
            self.i += width;
            return Some(c);
        }
        let kind = *rest.get(1)?;
        self.i += 2;
        Some(match kind {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = self.hex4_at(self.i)?;
                self.i += 4;
                if (0xD800..=0xDBFF).contains(&unit) {
                    let low = self.hex4_at(self.i + 2)?;
                    self.i += 6;
                    char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))?
                } else {
                    char::from_u32(unit)?
                }
            }
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    #[test]
    fn rewrites_only_the_top_level_model() {
        let body = br#"{"messages":[{"role":"user","model":"inner"}],"tools":{"model":"x"}, "model" : "gpt-4o" }"#;
        let out = rewrite_model(body, "claude-sonnet", LIMIT).unwrap();
        assert_eq!(
            &out[..],
            br#"{"messages":[{"role":"user","model":"inner"}],"tools":{"model":"x"}, "model" : "claude-sonnet" }"#
        );
    }

    #[test]
    fn escaped_key_is_recognised_as_model() {
        let body = br#"{"mod\u0065l":"a","x":1}"#;
        assert_eq!(read_model(body).unwrap(), "a");
        assert_eq!(
            &rewrite_model(body, "b", LIMIT).unwrap()[..],
            br#"{"mod\u0065l":"b","x":1}"#
        );
    }

    #[test]
    fn key_that_only_starts_like_model_is_not_model() {
        assert_eq!(
            read_model(br#"{"models":"a","mode":"b","mod\u0065ls":"c"}"#),
            Err(RewriteError::NoModelField)
        );
    }

    #[test]
    fn escaped_model_value_is_decoded_when_read() {
        let body = br#"{"model":"a\"b\\c\u00e9\ud83d\ude00"}"#;
        assert_eq!(read_model(body).unwrap(), "a\"b\\c\u{e9}\u{1F600}");
    }

    #[test]
    fn plain_model_value_is_borrowed() {
        assert!(matches!(
            read_model(br#"{"model":"gpt-4o"}"#).unwrap(),
            Cow::Borrowed("gpt-4o")
        ));
    }

    #[test]
    fn new_model_value_is_json_escaped() {
        let out = rewrite_model(br#"{"model":"a"}"#, "q\"\\\n\u{1}é", LIMIT).unwrap();
        assert_eq!(&out[..], "{\"model\":\"q\\\"\\\\\\n\\u0001é\"}".as_bytes());
    }

    #[test]
    fn typed_errors_for_each_refusal() {
        assert_eq!(read_model(b"[1,2]"), Err(RewriteError::NotAnObject));
        assert_eq!(read_model(b" \"s\" "), Err(RewriteError::NotAnObject));
        assert_eq!(read_model(br#"{"x":1}"#), Err(RewriteError::NoModelField));
        assert_eq!(
            read_model(br#"{"model":1}"#),
            Err(RewriteError::ModelNotAString)
        );
        assert_eq!(
            read_model(br#"{"model":"a","model":"b"}"#),
            Err(RewriteError::DuplicateModel)
        );
        assert_eq!(
            read_model(br#"{"model":"a","x":}"#),
            Err(RewriteError::Malformed { offset: 17 })
        );
        assert_eq!(read_model(b""), Err(RewriteError::Malformed { offset: 0 }));
        assert_eq!(
            read_model(b"{\"model\":\"a\"} x"),
            Err(RewriteError::Malformed { offset: 14 })
        );
        assert_eq!(
            rewrite_model(br#"{"model":"a"}"#, "abcdef", 15),
            Err(RewriteError::TooLarge { len: 18, limit: 15 })
        );
        assert_eq!(
            rewrite_model(br#"{"model":"a"}"#, "b", 5),
            Err(RewriteError::TooLarge { len: 13, limit: 5 })
        );
    }

    #[test]
    fn malformed_nested_values_are_rejected() {
        for bad in [
            &br#"{"model":"a","m":[1,]}"#[..],
            br#"{"model":"a","m":{"k" 1}}"#,
            br#"{"model":"a","m":01}"#,
            br#"{"model":"a","m":1.}"#,
            br#"{"model":"a","m":tru}"#,
            br#"{"model":"a","m":"\x"}"#,
            br#"{"model":"a","m":"\ud800"}"#,
            br#"{"model":"a","m":"\udc00\ud800"}"#,
            b"{\"model\":\"a\",\"m\":\"\x01\"}",
            b"{\"model\":\"a\",\"m\":\"\xff\"}",
            br#"{"model":"a","m":[}"#,
            br#"{"model":"a","m":{]}"#,
            br#"{"model":"a"}}"#,
            br#"{"model":"a""#,
        ] {
            assert!(
                matches!(read_model(bad), Err(RewriteError::Malformed { .. })),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn nesting_beyond_serde_json_limit_is_rejected() {
        let deep = |n: usize| {
            format!(
                "{{\"model\":\"a\",\"m\":{}{}}}",
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        // The top-level object is level 1: 126 nested arrays reach serde_json's 127.
        assert!(read_model(deep(126).as_bytes()).is_ok());
        assert!(matches!(
            read_model(deep(127).as_bytes()),
            Err(RewriteError::Malformed { .. })
        ));
    }

    #[test]
    fn model_anywhere_in_the_object_with_any_whitespace() {
        let body = b" \r\n\t{ \"a\" : [ ] ,\n \"model\"\t:\r\"m\" , \"b\" : { } } \n";
        let span = locate_model(body).unwrap();
        assert_eq!(&body[span.start..span.end], b"\"m\"");
    }

    #[test]
    fn invalid_utf8_inside_strings_is_refused() {
        for bad in [
            &b"\xc0\x80"[..],    // overlong NUL
            b"\xed\xa0\x80",     // an encoded surrogate
            b"\xf4\x90\x80\x80", // above U+10FFFF
            b"\xe6\x97",         // truncated before the closing quote
            b"\x80",             // a lone continuation byte
            b"ok\xff",
            b"\xe6\x97\xa5\xe6\x9c\xac\xff", // valid CJK, then a bad byte in the same run
            b"\xc3\xa9\xc3",                 // an accent, then a truncated one
        ] {
            let mut body = b"{\"model\":\"a\",\"m\":\"".to_vec();
            body.extend_from_slice(bad);
            body.extend_from_slice(b"\"}");
            assert!(
                matches!(read_model(&body), Err(RewriteError::Malformed { .. })),
                "accepted {bad:?}"
            );
        }
    }

    #[test]
    fn tricky_string_contents_agree_with_serde_json_at_every_alignment() {
        // Byte pairs where the word scan's borrow flags an ordinary byte above a real
        // hit ("# and \] and control+space), escapes and characters straddling an
        // 8-byte word boundary, and non-ASCII next to escapes.
        let contents = [
            r##"a\"#b"##,
            r##"x\\]y"##,
            r##"\\\\]]"##,
            r##"é\n東京\u00e9😀\""##,
            r##"\ud83d\ude00\/\b\f\r\t"##,
            "plain text long enough to cross a few words of eight bytes",
        ];
        for content in contents {
            for pad in 0..16 {
                let body = format!(
                    "{{\"k\":\"{}{content}\",\"model\":\"{}{content}\"}}",
                    "x".repeat(pad),
                    "y".repeat(pad)
                );
                let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(
                    read_model(body.as_bytes()).unwrap(),
                    parsed["model"].as_str().unwrap(),
                    "{body}"
                );
            }
        }
    }
}
