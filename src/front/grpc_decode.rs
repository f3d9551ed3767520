//! Undecodable protobuf is the client's error: INVALID_ARGUMENT with an `error-type`,
//! counted and logged, on every gRPC method (the health service's included).
//!
//! tonic decodes a request before any handler runs, and answers a message prost cannot
//! decode (or a call with no message at all) with INTERNAL, which our README keeps for
//! bugs. The codec is fixed per service (tonic-health's is prebuilt), so this layer, around
//! every service of the gRPC listener, rewrites those answers instead: it recognises them
//! by tonic's own message for them, the only thing that tells them apart from other
//! INTERNAL answers. tests/oip_grpc.rs sends bytes that are no protobuf to each method, so a
//! tonic or prost upgrade that changes the message fails there.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::{Code, Status};

use crate::core::Core;
use crate::error::Error;

/// What tonic-prost's decoder writes before prost's reason, and what tonic answers a unary
/// call that carried no message.
const DECODE_FAILED: &str = "failed to decode Protobuf message";
const NO_MESSAGE: &str = "Missing request message.";

#[derive(Clone)]
pub struct UndecodableLayer {
    pub core: Arc<Core>,
}

impl<S> tower::Layer<S> for UndecodableLayer {
    type Service = Undecodable<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Undecodable {
            inner,
            core: self.core.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Undecodable<S> {
    inner: S,
    core: Arc<Core>,
}

impl<S, B, RB> tower::Service<axum::http::Request<B>> for Undecodable<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_string();
        let core = self.core.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if let Some(error) = undecodable(response.headers(), &method) {
                replace_status(&mut response, core.refuse_undecodable(error));
            }
            Ok(response)
        })
    }
}

/// Replaces the status tonic put in a response's headers with our error's (for a layer
/// that knows the real reason of a failure tonic answered on its own).
pub(crate) fn replace_status<B>(response: &mut axum::http::Response<B>, error: Error) {
    response.extensions_mut().remove::<Status>();
    let headers = response.headers_mut();
    headers.remove(Status::GRPC_MESSAGE);
    headers.remove(Status::GRPC_STATUS_DETAILS);
    // A status that came from our own Error has printable ASCII only.
    Status::from(error)
        .add_header(headers)
        .expect("an error message from our own Error is a valid header: this is a bug");
}

/// The client's error, when `headers` hold tonic's INTERNAL answer to a message it could not
/// decode.
fn undecodable(headers: &axum::http::HeaderMap, method: &str) -> Option<Error> {
    let status = Status::from_header_map(headers)?;
    if status.code() != Code::Internal {
        return None;
    }
    let message = status.message();
    let reason = if let Some(reason) = message.strip_prefix(DECODE_FAILED) {
        reason.trim_start_matches(':').trim()
    } else if message == NO_MESSAGE {
        "the call carried no message"
    } else {
        return None;
    };
    Some(Error::MalformedProtobuf(format!(
        "the request to {method} is not a valid protobuf message: {reason}"
    )))
}
