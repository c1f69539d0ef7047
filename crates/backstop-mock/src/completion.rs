//! The bodies of successful answers: `chat.completion` JSON, SSE chunks, the model list.
//!
//! Everything here is a pure function of its inputs (no clock, no randomness) so
//! two runs of one scenario produce identical bytes.

use bytes::Bytes;
use serde_json::json;

/// The `created` timestamp every mock answer reports: a fixed epoch plus the
/// whole seconds since the mock started, so answers are reproducible.
pub(crate) const CREATED_EPOCH: u64 = 1_700_000_000;

/// What one successful answer is about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served<'a> {
    /// The model that served the request (echoed in `model`).
    pub(crate) model: &'a str,
    /// The attempt's arrival number, used in ids.
    pub(crate) seq: u64,
    /// `created` value.
    pub(crate) created: u64,
}

impl Served<'_> {
    fn completion_id(&self) -> String {
        format!("chatcmpl-mock-{}", self.seq)
    }

    /// The reply text: one word per stream chunk, so a stream's chunks
    /// concatenate to exactly the non-streaming content.
    pub(crate) fn reply_words(&self, chunks: usize) -> Vec<String> {
        (0..chunks.max(1)).map(|i| self.reply_word(i)).collect()
    }

    /// The `i`-th word of the reply (made alone: a stream of `n` chunks makes `n`
    /// words, not `n` lists of them).
    fn reply_word(&self, i: usize) -> String {
        if i == 0 {
            format!("mock({})", self.model)
        } else {
            format!(" w{i}")
        }
    }
}

/// A non-streaming `chat.completion` body whose content is the concatenation of
/// the `chunks` words a stream would carry.
pub(crate) fn completion_json(served: &Served<'_>, chunks: usize, finish_reason: &str) -> Bytes {
    let content = if finish_reason == "content_filter" {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(served.reply_words(chunks).concat())
    };
    let completion_tokens = chunks.max(1);
    let body = json!({
        "id": served.completion_id(),
        "object": "chat.completion",
        "created": served.created,
        "model": served.model,
        "system_fingerprint": "fp_mock",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": completion_tokens,
            "total_tokens": 9 + completion_tokens,
        },
    });
    Bytes::from(body.to_string())
}

/// The `k`-th SSE chunk frame (`data: {…}\n\n`) of a stream of `total` chunks;
/// the last one carries `finish_reason` when given.
pub(crate) fn chunk_frame(
    served: &Served<'_>,
    k: usize,
    total: usize,
    finish_reason: Option<&str>,
) -> Bytes {
    let word = if k < total.max(1) {
        served.reply_word(k)
    } else {
        String::new()
    };
    let delta = if k == 0 {
        json!({"role": "assistant", "content": word})
    } else {
        json!({"content": word})
    };
    let finish = if k + 1 == total { finish_reason } else { None };
    let chunk = json!({
        "id": served.completion_id(),
        "object": "chat.completion.chunk",
        "created": served.created,
        "model": served.model,
        "system_fingerprint": "fp_mock",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

/// The frame that ends a normal stream.
pub(crate) const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

/// `GET /v1/models`: the scenario's listed models, in name order.
pub(crate) fn models_json<'a>(models: impl Iterator<Item = &'a str>) -> Bytes {
    let data: Vec<_> = models
        .map(|id| {
            json!({"id": id, "object": "model", "created": CREATED_EPOCH, "owned_by": "backstop-mock"})
        })
        .collect();
    Bytes::from(json!({"object": "list", "data": data}).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_words_concatenate_to_the_completion_content() {
        let served = Served {
            model: "m",
            seq: 1,
            created: CREATED_EPOCH,
        };
        let body: serde_json::Value =
            serde_json::from_slice(&completion_json(&served, 3, "stop")).unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "mock(m) w1 w2");
        let mut streamed = String::new();
        for k in 0..3 {
            let frame = chunk_frame(&served, k, 3, Some("stop"));
            let text = std::str::from_utf8(&frame).unwrap();
            let json: serde_json::Value =
                serde_json::from_str(text.strip_prefix("data: ").unwrap().trim_end()).unwrap();
            streamed.push_str(json["choices"][0]["delta"]["content"].as_str().unwrap());
            let expected_finish = if k == 2 { json!("stop") } else { json!(null) };
            assert_eq!(json["choices"][0]["finish_reason"], expected_finish);
        }
        assert_eq!(streamed, "mock(m) w1 w2");
    }
}
