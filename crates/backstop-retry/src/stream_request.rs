//! Whether a request asks for a streamed answer.

/// Marks a request as a streaming one (`"stream": true`), so the retry layer holds
/// its response until the first SSE event when
/// [`HoldFirstEvent::Auto`](crate::HoldFirstEvent::Auto) is set. Insert it when the
/// body is not one the layer can scan, or to skip the scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StreamRequest;

/// Whether a chat-completions request body asks for a stream: it contains the key
/// `"stream"` followed (after optional whitespace and the colon) by `true`.
///
/// A byte scan, not a JSON parse, so it costs one pass over the body. It can be
/// fooled by a message whose *text* contains `"stream": true` verbatim with unescaped
/// quotes, which valid JSON cannot hold inside a string (the quotes would be escaped
/// as `\"stream\"`, which does not match); the worst outcome of a false positive is
/// that a `text/event-stream` response is held until its first event.
pub fn stream_requested(body: &[u8]) -> bool {
    const KEY: &[u8] = b"\"stream\"";
    let mut rest = body;
    while let Some(at) = find(rest, KEY) {
        let after = &rest[at + KEY.len()..];
        let after = trim_start(after);
        if let Some(after) = after.strip_prefix(b":")
            && trim_start(after).starts_with(b"true")
        {
            return true;
        }
        rest = &rest[at + 1..];
    }
    false
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (first, _) = needle.split_first()?;
    let mut from = 0;
    // Jump between quotes rather than compare a window at every byte.
    while let Some(i) = haystack[from..].iter().position(|b| b == first) {
        let at = from + i;
        if haystack[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .count();
    &bytes[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_true_is_found_with_or_without_spaces() {
        assert!(stream_requested(br#"{"model":"m","stream":true}"#));
        assert!(stream_requested(
            b"{\"model\":\"m\",\n  \"stream\" :\ttrue }"
        ));
    }

    #[test]
    fn stream_false_missing_or_escaped_is_not_a_stream() {
        assert!(!stream_requested(br#"{"model":"m","stream":false}"#));
        assert!(!stream_requested(br#"{"model":"m"}"#));
        assert!(!stream_requested(
            br#"{"messages":[{"content":"say \"stream\": true"}],"stream":false}"#
        ));
        assert!(!stream_requested(b""));
    }

    #[test]
    fn stream_options_key_is_not_confused_with_stream() {
        assert!(!stream_requested(
            br#"{"stream_options":{"include_usage":true}}"#
        ));
    }
}
