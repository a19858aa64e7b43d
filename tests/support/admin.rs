//! Reading the gateway's admin listener: `/metrics` samples, and waiting for a condition.

use super::{Response, request, with_timeout};
use http::Method;
use std::net::SocketAddr;
use std::time::Duration;

/// A `GET` on the admin listener (or any listener).
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, Method::GET, path, &[], "").await
}

/// The value of the sample line for `series` (name plus labels), 0 if absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `series` as `/metrics` on `admin` shows it now.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    sample(&get(admin, "/metrics").await.text(), series)
}

/// Polls `check` until it holds; bounded by the test timeout. Polling an observable
/// condition, not sleeping in the hope that it holds.
pub async fn eventually<F: AsyncFnMut() -> bool>(mut check: F) {
    with_timeout(async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}
