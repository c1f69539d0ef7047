//! Building the request for one hop from the caller's original request.
//!
//! Every hop starts again from the original: nothing one target set (URI,
//! credential, extra headers, rewritten body) can survive into the next hop.

use std::sync::Arc;

use backstop_classify::{Deadline, ModelRoute, ReplayBody};
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{Extensions, HeaderMap, HeaderValue, Method, Request, Uri, Version};

use crate::config::{Compiled, CompiledTarget};
use crate::rewrite::{self, ModelSpan};

/// The caller's request, kept to rebuild every hop from.
pub(crate) struct Original {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) extensions: Extensions,
    pub(crate) body: Bytes,
    /// Where the top-level model string is, and its decoded value.
    pub(crate) model_span: ModelSpan,
    pub(crate) model: Arc<str>,
}

impl Original {
    /// The request for the requested model when it has no target: the caller's own
    /// URI, headers and body, plus the route and deadline.
    pub(crate) fn pass_through(
        &self,
        deadline: Option<Deadline>,
    ) -> (Request<ReplayBody>, ModelRoute) {
        let route = match self.uri.authority() {
            Some(authority) => ModelRoute::at_authority(authority, self.model.clone()),
            None => ModelRoute::new("", self.model.clone()),
        };
        let mut request = Request::new(ReplayBody::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        finish(&mut request, &route, deadline);
        (request, route)
    }

    /// The request for `target`: its URI, only its credential, its headers, and the
    /// body with the model spelled as it spells it.
    pub(crate) fn for_target(
        &self,
        config: &Compiled,
        target: &CompiledTarget,
        deadline: Option<Deadline>,
    ) -> Result<(Request<ReplayBody>, ModelRoute), HopError> {
        let uri = target
            .uri_for(&self.uri, &config.caller_path_prefix)
            .map_err(|e| HopError(format!("target URI: {e}")))?;
        let body = if *target.provider_model == *self.model {
            // Same spelling: the original bytes, for a reference-count bump.
            self.body.clone()
        } else {
            Bytes::from(
                rewrite::splice(
                    &self.body,
                    self.model_span,
                    &target.provider_model,
                    config.max_body_bytes,
                )
                .map_err(|e| HopError(e.to_string()))?,
            )
        };

        let mut headers = self.headers.clone();
        // Every credential header any target uses, and the well-known ones, go: the
        // caller's key or the previous provider's never reaches this one. One pass
        // over the caller's few header names finds the ones present, instead of one
        // hash lookup per configured name (most of them absent).
        let mut has_content_length = false;
        for name in self.headers.keys() {
            if name == CONTENT_LENGTH {
                has_content_length = true;
            } else if name == HOST || config.removed_headers.contains(name) {
                headers.remove(name);
            }
        }
        if has_content_length {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        if let Some((name, value)) = &target.credential {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &target.extra_headers {
            headers.insert(name.clone(), value.clone());
        }

        let mut route = ModelRoute::new(target.upstream.clone(), target.provider_model.clone());
        route.credential = target.credential_label.clone();

        let mut request = Request::new(ReplayBody::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = headers;
        *request.extensions_mut() = self.extensions.clone();
        finish(&mut request, &route, deadline);
        Ok((request, route))
    }
}

fn finish(request: &mut Request<ReplayBody>, route: &ModelRoute, deadline: Option<Deadline>) {
    request.extensions_mut().insert(route.clone());
    if let Some(deadline) = deadline {
        request.extensions_mut().insert(deadline);
    }
}

/// A hop that could not be built (the message names why; never a credential).
#[derive(Debug)]
pub(crate) struct HopError(pub(crate) String);

impl std::fmt::Display for HopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request cannot be sent to its model's target: {}",
            self.0
        )
    }
}

impl std::error::Error for HopError {}
