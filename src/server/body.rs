//! A request body read whole, within its size limit, its time limit and the memory
//! budget, charged as it arrives.

use crate::budget::{Budgets, Charge};
use crate::error::{Busy, Error};
use bytes::{Bytes, BytesMut};
use http::Request;
use http::header::CONTENT_LENGTH;
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Reads the whole body within `limit` bytes and `timeout`, charging it to `budgets`
/// as it arrives: a body that does not fit is refused before the rest is read.
pub(super) async fn read_body(
    req: Request<Incoming>,
    budgets: &Budgets,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<(Bytes, Charge), Error> {
    let over_budget = Error::Overloaded(Busy::Memory);
    if !budgets.has_room() {
        return Err(over_budget);
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // A declared length is charged whole, up front: refused before a byte is read.
    let mut charge = match declared {
        Some(len) => budgets.charge(len).ok_or(over_budget.clone())?,
        None => budgets.empty(),
    };
    let mut body = req.into_body();
    // Most bodies arrive in one chunk: that one is kept as it came, without a copy.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                // The client broke off mid-body; whatever we answer will likely not arrive.
                tracing::debug!(error = %e, "reading request body failed");
                Error::InvalidRequest("request body could not be read")
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = buf.len() + first.as_ref().map_or(0, Bytes::len) + data.len();
            if len > limit {
                return Err(Error::PayloadTooLarge { limit });
            }
            if len > charge.bytes() && !charge.grow(len - charge.bytes()) {
                return Err(over_budget.clone());
            }
            match first.take() {
                None if buf.is_empty() => first = Some(data),
                earlier => {
                    if let Some(earlier) = earlier {
                        buf.reserve(declared.unwrap_or(len).min(limit));
                        buf.extend_from_slice(&earlier);
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok((first.unwrap_or_else(|| buf.freeze()), charge)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::BodyTimeout(timeout)),
    }
}
