//! Limits on a request's head, answered with the service's JSON errors. hyper enforces
//! limits of its own before a request exists, answered with an empty body; ours are lower,
//! so that every head hyper lets through and we refuse gets a JSON answer. The README
//! lists hyper's (a URI over 65534 bytes, more than 100 headers, a head over
//! [`MAX_HEAD_BUFFER`](super::connections::MAX_HEAD_BUFFER)).

use axum::http::Request;

use crate::error::Error;

/// Longest path and query. No route needs more (model names are file stems; the query
/// holds a few mode parameters).
pub const MAX_URI_BYTES: usize = 8 << 10;

/// Most header bytes (names and values) in one request.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

pub fn check<B>(request: &Request<B>) -> Result<(), Error> {
    let uri = request.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri > MAX_URI_BYTES {
        return Err(Error::UriTooLong(format!(
            "the request URI is {uri} bytes; the limit is {MAX_URI_BYTES}"
        )));
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers > MAX_HEADER_BYTES {
        return Err(Error::HeadersTooLarge(format!(
            "the request headers are {headers} bytes; the limit is {MAX_HEADER_BYTES}"
        )));
    }
    Ok(())
}
