//! The same verdicts for tower-http's `TraceLayer` (and anything else that takes a
//! [`ClassifyResponse`] / [`MakeClassifier`]).

use std::any::Any;
use std::fmt::Display;
use std::sync::Arc;
use std::time::SystemTime;

use http::{Request, Response};
use tower_http::classify::{
    ClassifiedResponse, ClassifyResponse, MakeClassifier, NeverClassifyEos,
};

use crate::{
    BoxError, Classification, ClassifiedError, Failure, FailureKind, Rules,
    classify_transport_error,
};

/// A tower-http classifier giving Backstop's [`Failure`] as the failure class.
///
/// A response that already went through [`Classify`](crate::Classify) (its extensions
/// hold a [`Classification`]) keeps that verdict, body evidence included; any other
/// response is classified by status and headers. Errors are classified like
/// transport errors. Streams are not followed to their end (`NeverClassifyEos`).
///
/// ```
/// use backstop_classify::BackstopClassifier;
/// use tower_http::trace::TraceLayer;
///
/// let trace = TraceLayer::new(BackstopClassifier::default());
/// # let _ = trace;
/// ```
#[derive(Clone, Debug, Default)]
pub struct BackstopClassifier {
    rules: Arc<Rules>,
}

impl BackstopClassifier {
    /// A classifier applying `rules`.
    pub fn new(rules: Rules) -> Self {
        BackstopClassifier {
            rules: Arc::new(rules),
        }
    }
}

impl ClassifyResponse for BackstopClassifier {
    type FailureClass = Failure;
    type ClassifyEos = NeverClassifyEos<Failure>;

    fn classify_response<B>(
        self,
        res: &Response<B>,
    ) -> ClassifiedResponse<Failure, NeverClassifyEos<Failure>> {
        let classification = match res.extensions().get::<Classification>() {
            Some(known) => known.clone(),
            None => {
                self.rules
                    .classify_response(res.status(), res.headers(), &[], SystemTime::now())
            }
        };
        match classification {
            Classification::Success => ClassifiedResponse::Ready(Ok(())),
            Classification::Failure(failure) => ClassifiedResponse::Ready(Err(failure)),
        }
    }

    fn classify_error<E>(self, error: &E) -> Failure
    where
        E: Display + 'static,
    {
        let error: &dyn Any = error;
        if let Some(classified) = error.downcast_ref::<ClassifiedError>() {
            return classified.failure().clone();
        }
        if let Some(boxed) = error.downcast_ref::<BoxError>() {
            return classify_transport_error(&**boxed);
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return classify_transport_error(io);
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            return classify_transport_error(hyper);
        }
        if let Some(client) = error.downcast_ref::<hyper_util::client::legacy::Error>() {
            return classify_transport_error(client);
        }
        Failure::new(FailureKind::ConnectionLost)
    }
}

impl MakeClassifier for BackstopClassifier {
    type Classifier = BackstopClassifier;
    type FailureClass = Failure;
    type ClassifyEos = NeverClassifyEos<Failure>;

    fn make_classifier<B>(&self, _req: &Request<B>) -> BackstopClassifier {
        self.clone()
    }
}
