//! Answers whose large buffers trim the heap once freed ([`memory_budget::trim_when_freed`]):
//! the gRPC listener's through [`TrimLargeLayer`], the HTTP listener's in
//! [`connections`](crate::front::connections).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;

use crate::core::memory_budget;

#[derive(Clone, Copy)]
pub struct TrimLargeLayer;

impl<S> tower::Layer<S> for TrimLargeLayer {
    type Service = TrimLargeService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TrimLargeService(inner)
    }
}

#[derive(Clone)]
pub struct TrimLargeService<S>(S);

impl<S, B, RB> tower::Service<axum::http::Request<B>> for TrimLargeService<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = axum::http::Response<TrimLarge<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let answer = self.0.call(request);
        Box::pin(async move { Ok(answer.await?.map(TrimLarge)) })
    }
}

/// An answer body whose large data frames trim the heap once freed.
pub struct TrimLarge<B>(B);

impl<B> TrimLarge<B> {
    pub fn new(body: B) -> TrimLarge<B> {
        TrimLarge(body)
    }
}

impl<B> http_body::Body for TrimLarge<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.0).poll_frame(cx));
        Poll::Ready(frame.map(|f| f.map(|f| f.map_data(memory_budget::trim_when_freed))))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}
